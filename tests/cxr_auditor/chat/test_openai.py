"""Tests of the OpenAI-compatible chat client (cxr_auditor.chat.openai), directly and through
the OpenAI grounder, against tests/support/openai_server.py on loopback."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cxr_auditor.chat import ChatRequest
from cxr_auditor.chat.openai import OpenAIChat, output_schema
from cxr_auditor.chat.transformers import TransformersChat
from cxr_auditor.errors import BackendError, ModelUnavailable
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding import build_grounder
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.openai import OpenAIGrounder
from cxr_auditor.labels import Label
from cxr_auditor.profiles import OpenAIProfile, TransformersProfile, parse_profile
from cxr_auditor.retry import AttemptSettings, attempt_settings
from cxr_auditor.schema import GroundingState
from tests.conftest import free_port
from tests.support import tinymodels as tm
from tests.support.model_fixtures import tiny_profile
from tests.support.openai_server import ChatServer


class _ByBrightness:
    """A stand-in model: black image → no_finding, anything brighter → pneumothorax."""

    def __init__(self) -> None:
        self.settings: list[AttemptSettings] = []

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]:
        self.settings.append(settings)
        out = []
        for r in requests:
            assert r.image is not None
            out.append(tm.BLACK_ANSWER if r.image.getpixel((0, 0)) == (0, 0, 0) else tm.WHITE_ANSWER)
        return out

    def close(self) -> None:
        return


@pytest.fixture
def server() -> Iterator[ChatServer]:
    srv = ChatServer({"cxr-v2": _ByBrightness(), "cxr-v2-lora": _ByBrightness()}).start()
    yield srv
    srv.stop()


def _profile(base_url: str, **fields: Any) -> OpenAIProfile:
    data = {
        "name": "remote",
        "task": "grounding",
        "backend": "openai",
        "model": "cxr-v2",
        "base_url": base_url,
        "backoff_seconds": 0,
        "max_retries": 2,
        **fields,
    }
    profile = parse_profile(data)
    assert isinstance(profile, OpenAIProfile)
    return profile


def _image(value: int, index: int) -> ImageInput:
    return ImageInput(tm.solid_image(value), index, Geometry.identity(64, 64))


class TestOpenAIGrounder:
    def test_images_travel_as_png_and_answers_are_parsed(self, server: ChatServer) -> None:
        grounder = build_grounder(_profile(server.base_url, concurrency=2))
        assert isinstance(grounder, OpenAIGrounder)
        results = grounder.ground([_image(0, 0), _image(255, 1), _image(0, 2)])
        assert [r.findings[0].label for r in results] == [
            Label.NO_FINDING,
            Label.PNEUMOTHORAX,
            Label.NO_FINDING,
        ]
        assert results[1].findings[0].box is not None
        body = server.requests[0]
        image_part, text_part = body["messages"][0]["content"]
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (64, 64)
        assert text_part["text"] == grounder.prompt and body["temperature"] == 0.0
        grounder.close()

    def test_adapter_is_selected_by_served_model_name(self, server: ChatServer) -> None:
        build_grounder(_profile(server.base_url, model="cxr-v2-lora")).ground([_image(0, 0)])
        assert [r["model"] for r in server.requests] == ["cxr-v2-lora"]

    @pytest.mark.parametrize(
        ("mode", "key"), [("response_format", "response_format"), ("guided_json", "guided_json")]
    )
    def test_structured_output_sends_the_findings_schema(
        self, server: ChatServer, mode: str, key: str
    ) -> None:
        build_grounder(_profile(server.base_url, structured_output=mode)).ground([_image(0, 0)])
        sent = server.requests[0][key]
        schema = sent["json_schema"]["schema"] if key == "response_format" else sent
        assert schema == output_schema("grounding_json")
        assert "pneumothorax" in schema["items"]["properties"]["label"]["enum"]

    def test_no_structured_output_by_default(self, server: ChatServer) -> None:
        build_grounder(_profile(server.base_url)).ground([_image(0, 0)])
        assert "response_format" not in server.requests[0] and "guided_json" not in server.requests[0]


class TestOpenAIChatErrors:
    def test_5xx_is_retried_then_succeeds(self, server: ChatServer) -> None:
        server.fail_next = 2
        (result,) = build_grounder(_profile(server.base_url)).ground([_image(255, 0)])
        assert result.state is GroundingState.OK and len(server.requests) == 3

    def test_5xx_beyond_the_retry_budget_is_a_backend_error(self, server: ChatServer) -> None:
        server.fail_next = 10
        chat = OpenAIChat(_profile(server.base_url, max_retries=1))
        with pytest.raises(BackendError, match=r"failed after 2 attempts \(HTTP 503\)"):
            chat.generate([ChatRequest("x", tm.solid_image(0))], attempt_settings(1))

    def test_unknown_model_fails_at_once(self, server: ChatServer) -> None:
        chat = OpenAIChat(_profile(server.base_url, model="nope"))
        with pytest.raises(BackendError, match="HTTP 404"):
            chat.generate([ChatRequest("x", tm.solid_image(0))], attempt_settings(1))
        assert len(server.requests) == 1

    def test_a_server_nobody_serves_makes_the_model_unavailable(self) -> None:
        """Connection refused on every try: the jobs wait for the model, they do not die."""
        chat = OpenAIChat(_profile(f"http://127.0.0.1:{free_port()}/v1", max_retries=1))
        with pytest.raises(ModelUnavailable, match="ConnectError"):
            chat.generate([ChatRequest("x", tm.solid_image(0))], attempt_settings(1))

    def test_sampling_rung_sends_temperature_and_top_p(self, server: ChatServer) -> None:
        chat = OpenAIChat(_profile(server.base_url))
        chat.generate([ChatRequest("x", tm.solid_image(0))], attempt_settings(3))
        assert (server.requests[0]["temperature"], server.requests[0]["top_p"]) == (0.4, 0.9)


class TestApiKey:
    def test_key_from_env_is_sent_and_never_shown(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        secret = "sk-test-SENTINEL-KEY"
        monkeypatch.setenv("TEST_CXR_KEY", secret)
        srv = ChatServer({"cxr-v2": _ByBrightness()}, api_key=secret).start()
        try:
            caplog.set_level(logging.DEBUG)
            chat = OpenAIChat(_profile(srv.base_url, api_key_env="TEST_CXR_KEY"))
            answers = chat.generate([ChatRequest("x", tm.solid_image(0))], attempt_settings(1))
            assert answers == [tm.BLACK_ANSWER]
            assert srv.headers[0]["Authorization"] == f"Bearer {secret}"
            assert secret not in repr(chat) and "[secure]" in repr(chat)
            assert secret not in caplog.text
        finally:
            srv.stop()

    def test_missing_key_is_refused_by_a_server_that_wants_one(self) -> None:
        srv = ChatServer({"cxr-v2": _ByBrightness()}, api_key="k").start()
        try:
            chat = OpenAIChat(_profile(srv.base_url, api_key_env="TEST_CXR_KEY_UNSET"))
            with pytest.raises(BackendError, match="HTTP 401"):
                chat.generate([ChatRequest("x", tm.solid_image(0))], attempt_settings(1))
        finally:
            srv.stop()


@pytest.mark.slow
def test_server_around_the_trained_tiny_model(trained_gemma: Path) -> None:
    """The whole path: PNG data URL → HTTP → tiny Gemma 3 → JSON → parsed findings."""
    local = parse_profile(tiny_profile("cxr-auditor-v2", trained_gemma, prompt="explain_my_xray"))
    assert isinstance(local, TransformersProfile)
    srv = ChatServer({"tiny": TransformersChat(local)}).start()
    try:
        remote = _profile(srv.base_url, model="tiny", prompt="explain_my_xray")
        results = build_grounder(remote).ground([_image(255, 0), _image(0, 1)])
    finally:
        srv.stop()
    assert [r.findings[0].label for r in results] == [Label.PNEUMOTHORAX, Label.NO_FINDING]
    box = results[0].findings[0].box
    assert box is not None and box.as_list() == pytest.approx([0.1, 0.6, 0.5, 0.9])
