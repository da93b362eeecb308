"""The chat request and the backend protocol every model user talks to.

A :class:`ChatBackend` turns a batch of :class:`ChatRequest` (one user turn: optional image,
then text) into one answer text each, under the sampling of one retry rung
(:class:`~cxr_auditor.retry.AttemptSettings`). Grounders, draft parsers and classifiers sit on
top of it and never see which backend answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from cxr_auditor.retry import AttemptSettings

__all__ = ["ChatBackend", "ChatRequest"]


@dataclass(frozen=True)
class ChatRequest:
    """One single-turn request: ``image`` (optional) then ``text`` in the user turn."""

    text: str
    image: Image.Image | None = None
    system: str | None = None


class ChatBackend(Protocol):
    """Anything that answers a batch of chat requests (one text per request, in order)."""

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]: ...

    def close(self) -> None: ...
