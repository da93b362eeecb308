"""Binding a TCP port: one place for the address family and the socket options.

Used by ``serve`` (which binds its ports before any state work) and by ``doctor`` (which tries
the same bind to tell whether ``serve`` could).
"""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port``, not yet listening (IPv6 when ``host`` has a colon).

    SO_REUSEADDR lets a restarted agent bind while connections of the previous one linger in
    TIME_WAIT; ``reuse_port`` (SO_REUSEPORT) lets the listener pool's processes share the port.

    Raises:
        OSError: the bind failed (``EADDRINUSE``: another socket listens there; ``EACCES``: a
            privileged port).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def free_loopback_port() -> int:
    """A TCP port free on loopback now; whoever binds it next should do so at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
