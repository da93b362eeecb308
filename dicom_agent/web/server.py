"""The agent's HTTP server: uvicorn on a daemon thread, bound before it serves.

The socket is bound in the constructor, so ``serve`` finds a taken port before any state work
(the caller reports it); :meth:`WebServer.start` then serves an ASGI app on it. Limits come from
``health.*``: at most ``max_connections`` open connections (more are answered 503 by uvicorn),
an idle kept-alive connection is closed after ``keep_alive_seconds``, and a connection that has
not sent a complete request head within ``header_timeout_seconds`` is closed (uvicorn itself
would wait for ever on a client that sends half a request line). Requests run on the event loop
thread; synchronous page handlers run on Starlette's bounded thread pool (40 threads), so the
server never starts a thread per connection. The access log is off: request paths carry Study
Instance UIDs, which must not reach the logs (STYLE.md section 4).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicom_agent.config import HealthSettings
from dicom_agent.ports import bind_tcp

log = logging.getLogger(__name__)

_STOP_SECONDS = 5.0


class _HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request head of each request."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._head_expired
        )

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._head_timer is not None:
            # a complete request head arrived: the request now runs under the app's control
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_timer is None and not self.transport.is_closing():
            # the next request on this kept-alive connection gets its own deadline
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            log.debug("HTTP connection closed: no complete request head in time")
            self.transport.close()


class WebServer:
    """Serve an ASGI app on ``settings.host:settings.port`` from a daemon thread.

    Raises:
        OSError: the port cannot be bound (taken, or no permission).
    """

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        sock = bind_tcp(settings.host, settings.port)
        try:
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self, app: Any) -> None:
        """Serve ``app`` (an ASGI application) on the bound socket until :meth:`stop`."""
        protocol = type(
            "HeadTimeoutProtocol",
            (_HeadTimeoutProtocol,),
            {"header_timeout": self.settings.header_timeout_seconds},
        )
        config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            limit_concurrency=self.settings.max_connections,
            timeout_keep_alive=max(1, round(self.settings.keep_alive_seconds)),
            timeout_graceful_shutdown=int(_STOP_SECONDS),
        )
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="web", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=_STOP_SECONDS + 1)
        self._socket.close()
