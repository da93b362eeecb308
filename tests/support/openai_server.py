"""A small OpenAI-compatible chat-completions server on loopback, around tiny local models.

Enough of the protocol for :mod:`cxr_auditor.chat.openai`: ``POST /v1/chat/completions``
with text and ``image_url`` (base64 PNG data URL) parts. ``models`` maps served names to chat
backends, so a test can register a base model and an "adapter" under two names, as vLLM does
with LoRA modules. ``fail_next`` makes the next N requests answer HTTP 503 (retry tests); every
request body is recorded in ``requests`` for assertions.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from cxr_auditor.chat import ChatBackend, ChatRequest
from cxr_auditor.retry import attempt_settings


class ChatServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``base_url`` ends in ``/v1``."""

    def __init__(self, models: dict[str, ChatBackend], api_key: str | None = None) -> None:
        self.models = models
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_next = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        backend = self.models.get(body.get("model", ""))
        if backend is None:
            return 404, {"error": {"message": "model not found"}}
        text, image = "", None
        for message in body.get("messages", []):
            if message.get("role") != "user":
                continue
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "image_url":
                    data = part["image_url"]["url"].split(",", 1)[1]
                    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        rung = 1 if float(body.get("temperature", 0.0)) == 0.0 else 3
        with self._lock:  # one generate at a time on the shared model
            answer = backend.generate([ChatRequest(text, image)], attempt_settings(rung))[0]
        return 200, {
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    failing = server.fail_next > 0
                    server.fail_next -= int(failing)
                if failing:
                    self._send(503, {"error": {"message": "overloaded"}})
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "no such endpoint"}})
                    return
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "bad key"}})
                    return
                self._send(*server._answer(body))

        return Handler
