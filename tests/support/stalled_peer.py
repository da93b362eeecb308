"""Peers that stall mid-PDU, for the forwarder's timeout tests: real sockets on loopback.

:class:`StalledPeer` accepts, reads the A-ASSOCIATE-RQ, sends the first bytes of an
A-ASSOCIATE-AC (its PDU header announces more) and goes silent with the socket open.
:class:`StallingProxy` relays an association to a real SCP and stalls in the middle of the
peer's n-th PDU (n = 1: the first P-DATA-TF, i.e. the C-STORE response): the association is
established, the data set is sent, and the answer never completes. PDU layout: PS3.8 9.3.1
(type, reserved, 4-byte big-endian length).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

_HEADER = 6
_SOCKET_TIMEOUT = 30.0  # every socket of the test peers has one; the tests end far sooner


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _read_pdu(sock: socket.socket) -> bytes:
    header = _recv_exact(sock, _HEADER)
    (length,) = struct.unpack(">I", header[2:])
    return header + _recv_exact(sock, length)


class _Server:
    """A listening socket on loopback whose connections are served by ``handle`` threads."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_SOCKET_TIMEOUT)
        self.port = int(self._listener.getsockname()[1])
        self._handle = handle
        self._closed = threading.Event()
        self.connections = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue  # the timeout only lets close() be noticed
            except OSError:
                return
            conn.settimeout(_SOCKET_TIMEOUT)
            self.connections += 1
            self._sockets.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def wait_closed(self) -> None:
        """Block until :meth:`close` (the handlers' way of stalling with the socket open)."""
        self._closed.wait(_SOCKET_TIMEOUT)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StalledPeer(_Server):
    """Accepts, reads the A-ASSOCIATE-RQ, sends 8 bytes of an A-ASSOCIATE-AC, goes silent."""

    def __init__(self) -> None:
        super().__init__(self._stall)

    def _stall(self, conn: socket.socket) -> None:
        try:
            _read_pdu(conn)
            conn.sendall(b"\x02\x00" + struct.pack(">I", 1024) + b"\x00\x01")
        except OSError:
            return
        self.wait_closed()


class SilentPeer(_Server):
    """Accepts and never sends a byte (a TLS client waits for the ServerHello for ever)."""

    def __init__(self) -> None:
        super().__init__(lambda conn: self.wait_closed())


class StallingProxy(_Server):
    """Relays to the SCP on ``upstream_port``; stalls mid-way through the SCP's PDU number
    ``stall_at`` (0 is the A-ASSOCIATE-AC), of which only the first 8 bytes get through.

    With ``deaf=True`` it relays the association both ways and then stops reading what the
    client sends (a PACS that stopped reading): the client's sends block once the socket
    buffers are full.
    """

    def __init__(self, upstream_port: int, stall_at: int | None = 1, deaf: bool = False) -> None:
        self._upstream_port = upstream_port
        self._stall_at = stall_at
        self._deaf = deaf
        self.stalled = threading.Event()
        super().__init__(self._relay)

    def _relay(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=5)
        upstream.settimeout(_SOCKET_TIMEOUT)
        self._sockets.append(upstream)
        if self._deaf:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            threading.Thread(target=self._association_only, args=(conn, upstream),
                             daemon=True).start()
        else:
            threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True).start()
        try:
            for index in range(1 << 20):
                pdu = _read_pdu(upstream)
                if index == self._stall_at:
                    conn.sendall(pdu[:8])
                    self.stalled.set()
                    break
                conn.sendall(pdu)
        except OSError:
            return
        self.wait_closed()

    def _association_only(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            sink.sendall(_read_pdu(source))  # the A-ASSOCIATE-RQ, then nothing is read
        except OSError:
            return
        self.stalled.set()
        self.wait_closed()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            return


class FullBacklog:
    """A listening socket that never accepts, its backlog filled: the kernel drops further
    SYNs, so a new ``connect`` neither succeeds nor fails until the caller's timeout."""

    def __init__(self, fillers: int = 4) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = int(self._listener.getsockname()[1])
        self._fillers: list[socket.socket] = []
        for _ in range(fillers):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self._fillers.append(filler)

    def close(self) -> None:
        for sock in (*self._fillers, self._listener):
            sock.close()

    def __enter__(self) -> FullBacklog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
