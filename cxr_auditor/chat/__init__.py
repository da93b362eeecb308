"""The model chat layer: one request type, one backend protocol, two backends.

:mod:`cxr_auditor.chat.base` holds :class:`ChatRequest` and :class:`ChatBackend`;
:mod:`cxr_auditor.chat.transformers` loads a model (and merges its adapter) in this process;
:mod:`cxr_auditor.chat.openai` talks to an OpenAI-compatible server; :mod:`cxr_auditor.chat.hub`
says whether a profile's hub repository can be loaded here. Grounding, draft parsing and
classification sit on top of this layer; it knows nothing of them.
"""

from __future__ import annotations

from cxr_auditor.chat.base import ChatBackend, ChatRequest
from cxr_auditor.chat.openai import OpenAIChat
from cxr_auditor.chat.transformers import TransformersChat
from cxr_auditor.errors import BackendError
from cxr_auditor.profiles import OpenAIProfile, Profile, TransformersProfile

__all__ = ["ChatBackend", "ChatRequest", "build_chat_backend"]


def build_chat_backend(profile: Profile) -> ChatBackend:
    """The chat backend a ``transformers`` or ``openai`` profile names.

    Raises:
        ModelUnavailable: the model cannot be loaded (transformers backend).
        BackendError: the profile's backend has no chat model (``fake``, ``rules``).
    """
    if isinstance(profile, TransformersProfile):
        return TransformersChat(profile)
    if isinstance(profile, OpenAIProfile):
        return OpenAIChat(profile)
    raise BackendError(f"profile {profile.name!r}: backend {profile.backend!r} has no chat model")
