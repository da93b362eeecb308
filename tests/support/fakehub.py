"""A local stand-in for the Hugging Face hub, and a recording HTTPS proxy, on loopback.

No weights can be downloaded on the test machines, so ``cxr-agent models pull`` and the hub
check of ``doctor`` and the loader are driven against :class:`FakeHub`: a few HTTP endpoints
that answer the way the hub answers huggingface_hub's client (revision info, the file tree, file
metadata and contents, ``X-Error-Code`` for gated and missing repositories). Point a process at
it with ``HF_ENDPOINT`` (read when huggingface_hub is imported, so use a subprocess).
:class:`RecordingProxy` answers every CONNECT with 502 and keeps the request lines, to prove the
hub client went through ``HTTPS_PROXY``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "c0ffee" + "0" * 34  # a 40-hex commit id every repository of the fake hub is at


class FakeHub:
    """``repos``: repo id -> {file name: bytes}; ``gated``: repo ids refused without access."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str] | None = None) -> None:
        self.repos = repos
        self.gated = gated or set()
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # every socket has a timeout

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        self.requests.append((h.command, h.path))
        parts = h.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            files = self._files(h, repo)
            if files is None:
                return
            if rest[:1] == ["tree"]:
                listing = [{"type": "file", "path": n, "size": len(b), "oid": _oid(b)} for n, b in files.items()]
                _send(h, 200, json.dumps(listing).encode(), body, {"Content-Type": "application/json"})
            else:
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]}
                _send(h, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            files = self._files(h, "/".join(parts[:2]))
            if files is None:
                return
            data = files.get("/".join(parts[4:]))
            if data is None:
                _send(h, 404, b"", body, {"X-Error-Code": "EntryNotFound"})
                return
            _send(h, 200, data, body, {"ETag": f'"{_oid(data)}"', "X-Repo-Commit": COMMIT})
            return
        _send(h, 404, b"", body, {"X-Error-Code": "RepoNotFound"})

    def _files(self, h: BaseHTTPRequestHandler, repo: str) -> dict[str, bytes] | None:
        if repo in self.gated:
            _send(h, 403, b"", h.command == "GET", {"X-Error-Code": "GatedRepo"})
            return None
        if repo not in self.repos:
            _send(h, 401, b"", h.command == "GET", {"X-Error-Code": "RepoNotFound"})
            return None
        return self.repos[repo]


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()  # noqa: S324 - the hub's git blob-style id, not security


def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
    h.send_response(status)
    for name, value in headers.items():
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if body:
        h.wfile.write(data)


class RecordingProxy:
    """An HTTP proxy that records each request line and refuses it (502 Bad Gateway)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    head = conn.recv(4096).decode("latin-1")
                    self.lines.append(head.split("\r\n", 1)[0])
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
