"""The chat backend for models behind an OpenAI-compatible server (vLLM, SGLang, ...).

Images travel as base64 PNG data URLs inside the user turn (image part first, then the text, as
the Gemma 3 fine-tunes were trained). A LoRA adapter registered on the server is chosen by its
served name in the profile's ``model``. Transient failures (HTTP 5xx, 429, connection errors and
timeouts) are retried with exponential backoff, then raised as
:class:`~cxr_auditor.errors.BackendError`; a 4xx other than 429 fails at once. Requests of a
batch run concurrently up to ``concurrency``. The API key comes from the environment variable
``api_key_env`` and is never logged (``repr`` masks it).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image

from cxr_auditor.chat.base import ChatRequest
from cxr_auditor.errors import BackendError, ModelUnavailable
from cxr_auditor.labels import LABELS
from cxr_auditor.profiles import OpenAIProfile
from cxr_auditor.retry import AttemptSettings

__all__ = ["OpenAIChat", "image_data_url", "output_schema"]

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def output_schema(parser: str) -> dict[str, Any] | None:
    """JSON Schema of the answer a parser expects, for servers that constrain decoding."""
    labels = [str(label) for label in LABELS]
    if parser == "grounding_json":
        box = {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
        item = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": labels}, "box_2d": box},
            "required": ["label", "box_2d"],
        }
    elif parser == "draft_json":
        item = {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": labels},
                "status": {"type": "string", "enum": ["present", "absent", "uncertain"]},
                "span": {"type": "string"},
            },
            "required": ["label", "status", "span"],
        }
    else:
        return None
    return {"type": "array", "items": item}


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL of ``image`` (RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIChat:
    """Chat-completions client for one profile (thread-safe; one httpx connection pool)."""

    def __init__(self, profile: OpenAIProfile, transport: httpx.BaseTransport | None = None) -> None:
        self.profile = profile
        headers = {}
        if profile.api_key_env:
            key = os.environ.get(profile.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            base_url=profile.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(profile.timeout_seconds, connect=min(10.0, profile.timeout_seconds)),
            limits=httpx.Limits(max_connections=profile.concurrency),
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(max_workers=profile.concurrency)
        self._schema = output_schema(profile.output_parser)

    def __repr__(self) -> str:
        return f"OpenAIChat(profile={self.profile.name!r}, base_url={self.profile.base_url!r}, api_key=[secure])"

    def _body(self, req: ChatRequest, settings: AttemptSettings) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if req.image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(req.image)}})
        content.append({"type": "text", "text": req.text})
        messages: list[dict[str, Any]] = []
        if req.system:
            messages.append({"role": "system", "content": req.system})
        messages.append({"role": "user", "content": content})
        gen = self.profile.generation
        body: dict[str, Any] = {
            "model": self.profile.model,
            "messages": messages,
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.sampling.temperature if settings.do_sample else 0.0,
        }
        if settings.do_sample:
            body["top_p"] = gen.sampling.top_p
        if gen.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": gen.enable_thinking}
        if self._schema is not None and self.profile.structured_output == "response_format":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "findings", "schema": self._schema},
            }
        elif self._schema is not None and self.profile.structured_output == "guided_json":
            body["guided_json"] = self._schema
        return body

    def _post(self, body: dict[str, Any]) -> str:
        profile = self.profile
        last = ""
        unreachable = True  # every attempt failed to connect: nobody is serving the model
        for attempt in range(profile.max_retries + 1):
            if attempt:
                time.sleep(profile.backoff_seconds * 2 ** (attempt - 1))
            try:
                response = self._client.post("chat/completions", json=body)
            except httpx.TransportError as exc:
                unreachable = unreachable and isinstance(exc, httpx.ConnectError)
                last = f"{type(exc).__name__}"
                logger.warning("profile %s: %s (attempt %d)", profile.name, last, attempt + 1)
                continue
            unreachable = False
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                logger.warning("profile %s: %s (attempt %d)", profile.name, last, attempt + 1)
                continue
            if response.status_code >= 400:
                raise BackendError(
                    f"profile {profile.name!r}: server answered HTTP {response.status_code} "
                    f"at {profile.base_url}"
                )
            try:
                message = response.json()["choices"][0]["message"]
                return str(message.get("content") or "")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise BackendError(
                    f"profile {profile.name!r}: malformed chat-completions response"
                ) from exc
        message = (
            f"profile {profile.name!r}: {profile.base_url} failed after "
            f"{profile.max_retries + 1} attempts ({last})"
        )
        # A server that is down or restarting makes the model unavailable (jobs wait for it);
        # one that answers with errors or times out fails the job, which retries and may die.
        raise ModelUnavailable(message) if unreachable else BackendError(message)

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]:
        """One answer per request; requests run concurrently up to ``concurrency``."""
        bodies = [self._body(r, settings) for r in requests]
        return list(self._pool.map(self._post, bodies))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

