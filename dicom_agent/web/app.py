"""The Starlette application: pages, static files, and the login when one is configured."""

from __future__ import annotations

import base64
import hmac
from pathlib import Path
from types import ModuleType

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_agent.config import WebSettings
from dicom_agent.web import audit_one, health, monitoring, queue, studies, study
from dicom_agent.web.context import AgentView

#: One module per page: each has ``ROUTES`` and ``NAV`` (``(label, path)`` or None).
PAGES: tuple[ModuleType, ...] = (health, studies, study, queue, monitoring, audit_one)

#: Paths served without the login: probes and Prometheus must work unattended.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
TOKEN_COOKIE = "cxr_agent_token"

_STATIC = Path(__file__).resolve().parent / "static"


class _Login:
    """``web.auth``: a bearer token (header, cookie, or ``?token=`` once) or HTTP basic.

    Also refuses a POST whose ``Origin`` is another site, so a page elsewhere cannot make a
    logged-in browser start re-audits or resends.
    """

    def __init__(self, app: ASGIApp, settings: WebSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.method == "POST" and not _same_origin(request):
            await PlainTextResponse("cross-site request refused\n", 403)(scope, receive, send)
            return
        if self.settings.auth == "none" or request.url.path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.settings.auth == "basic":
            if self._basic_ok(request):
                await self.app(scope, receive, send)
                return
            challenge = {"WWW-Authenticate": 'Basic realm="cxr-agent (research use only)"'}
            await PlainTextResponse("login required\n", 401, headers=challenge)(scope, receive, send)
            return
        response = self._token(request)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def _basic_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        assert self.settings.username is not None and self.settings.password is not None
        return hmac.compare_digest(user, self.settings.username) & hmac.compare_digest(
            password, self.settings.password.get_secret_value()
        )

    def _token(self, request: Request) -> Response | None:
        """None when the request carries the token; else the response to send instead."""
        assert self.settings.token is not None
        token = self.settings.token.get_secret_value()
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else None
        offered = offered or request.cookies.get(TOKEN_COOKIE)
        if offered is not None and hmac.compare_digest(offered, token):
            return None
        query = request.query_params.get("token")
        if query is not None and hmac.compare_digest(query, token):
            # set the cookie and drop the token from the address bar (and from history)
            clean = request.url.remove_query_params("token")
            redirect = RedirectResponse(str(clean), 303)
            redirect.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return redirect
        return PlainTextResponse("login required: open the page once with ?token=...\n", 401)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin.split("://", 1)[-1] == request.headers.get("host")


def create_app(agent: AgentView) -> Starlette:
    """The web app over ``agent``: health endpoints always, pages unless ``web.enabled`` is off."""
    pages = PAGES if agent.settings.web.enabled else (health,)
    routes: list[Route | Mount] = []
    for page in pages:
        routes += page.ROUTES
    if agent.settings.web.enabled:
        routes.append(Mount("/static", StaticFiles(directory=_STATIC), name="static"))
        routes.append(Route("/", lambda request: RedirectResponse("/studies", 303)))
    app = Starlette(
        routes=routes, middleware=[Middleware(_Login, settings=agent.settings.web)]
    )
    app.state.agent = agent
    app.state.nav = [page.NAV for page in pages if page.NAV is not None]
    return app
