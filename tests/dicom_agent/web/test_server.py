"""The real server: login modes, cross-site POSTs, the head timeout, the connection cap, and
the config refusing pages off loopback without a login."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.errors import ConfigError
from dicom_agent.web import WebServer, create_app
from tests.dicom_agent.web.conftest import WebAgent


@pytest.fixture
def served(web_agent: WebAgent) -> Iterator[str]:
    server = WebServer(web_agent.settings.health)
    server.start(create_app(web_agent))
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def get(url: str, **kw: object) -> httpx.Response:
    return httpx.get(url, timeout=10, **kw)  # type: ignore[arg-type]


class TestLogin:
    @pytest.fixture
    def web_agent(self, settings: AgentSettings, request: pytest.FixtureRequest) -> WebAgent:
        settings.web.auth = request.param
        settings.web.token = SecretStr("s3cret-token")
        settings.web.username = "reader"
        settings.web.password = SecretStr("pw")
        return WebAgent(settings)

    @pytest.mark.parametrize("web_agent", ["token"], indirect=True)
    def test_token(self, served: str) -> None:
        assert get(served + "/studies").status_code == 401
        assert get(served + "/healthz").status_code == 200  # probes stay open
        assert get(served + "/metrics").status_code == 200
        ok = get(served + "/studies", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and "RESEARCH USE ONLY" in ok.text
        with httpx.Client(base_url=served, timeout=10, follow_redirects=True) as browser:
            first = browser.get("/queue", params={"token": "s3cret-token"})
            assert first.status_code == 200 and "token" not in str(first.url)
            assert browser.get("/studies").status_code == 200  # the cookie carries on
        assert get(served + "/studies", params={"token": "wrong"}).status_code == 401

    @pytest.mark.parametrize("web_agent", ["basic"], indirect=True)
    def test_basic(self, served: str) -> None:
        r = get(served + "/studies")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert get(served + "/studies", auth=("reader", "wrong")).status_code == 401
        assert get(served + "/studies", auth=("reader", "pw")).status_code == 200
        garbage = {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()}
        assert get(served + "/studies", headers=garbage).status_code == 401


def test_a_cross_site_post_is_refused(served: str, audited: str) -> None:
    url = f"{served}/studies/{audited}/reaudit"
    assert httpx.post(url, headers={"Origin": "https://evil.example"}, timeout=10).status_code == 403
    host = served.split("://", 1)[1]
    same = httpx.post(url, headers={"Origin": f"http://{host}"}, timeout=10)
    assert same.status_code == 303


def test_a_stalled_request_head_is_cut(settings: AgentSettings, web_agent: WebAgent) -> None:
    settings.health.header_timeout_seconds = 0.3
    server = WebServer(settings.health)
    server.start(create_app(web_agent))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
            assert sock.recv(100) == b""  # closed by the server, not by our 10 s timeout
        assert get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
    finally:
        server.stop()


def test_connections_past_the_cap_get_503(settings: AgentSettings, web_agent: WebAgent) -> None:
    settings.health.max_connections = 2
    server = WebServer(settings.health)
    server.start(create_app(web_agent))
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        with httpx.Client(timeout=10) as c:
            statuses = {c.get(f"http://127.0.0.1:{server.port}/healthz").status_code}
        assert statuses == {503}
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_taken_port_fails_at_bind(settings: AgentSettings) -> None:
    first = WebServer(settings.health)
    try:
        with pytest.raises(OSError):
            WebServer(settings.health.model_copy(update={"port": first.port}))
    finally:
        first.stop()


def test_pages_off_loopback_need_a_login(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_AGENT__HEALTH__HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="health.host 0.0.0.0 is not loopback"):
        load_settings()
    monkeypatch.setenv("CXR_AGENT__WEB__AUTH", "token")
    with pytest.raises(ConfigError, match="needs web.token"):
        load_settings()
    monkeypatch.setenv("CXR_AGENT__WEB__TOKEN", "t")
    assert load_settings().web.auth == "token"
    monkeypatch.setenv("CXR_AGENT__WEB__AUTH", "none")
    monkeypatch.setenv("CXR_AGENT__WEB__ALLOW_WITHOUT_LOGIN", "true")  # container: host loopback
    assert load_settings().web.auth == "none"
    monkeypatch.delenv("CXR_AGENT__WEB__ALLOW_WITHOUT_LOGIN")
    monkeypatch.setenv("CXR_AGENT__HEALTH__HOST", "::1")
    monkeypatch.setenv("CXR_AGENT__WEB__AUTH", "none")
    assert load_settings().health.host == "::1"
