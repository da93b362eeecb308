"""Grounding with a model behind an OpenAI-compatible server (the client is
:class:`~cxr_auditor.chat.openai.OpenAIChat`)."""

from __future__ import annotations

import httpx

from cxr_auditor.chat.openai import OpenAIChat
from cxr_auditor.grounding._common import ChatGrounder
from cxr_auditor.profiles import OpenAIProfile

__all__ = ["OpenAIGrounder"]


class OpenAIGrounder(ChatGrounder):
    """A grounding profile with ``backend: openai``."""

    def __init__(self, profile: OpenAIProfile, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(profile, OpenAIChat(profile, transport))
