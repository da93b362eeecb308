"""Grounding with a model loaded in this process (transformers; CUDA when present, else CPU).

The model loads when the grounder is built (the worker builds it once, at start); failures are
:class:`~cxr_auditor.errors.ModelUnavailable` naming the profile and what is missing. Images are
generated in left-padded batches under ``torch.inference_mode``; the retry ladder re-generates
only the images whose answer did not parse.
"""

from __future__ import annotations

from cxr_auditor.chat.transformers import LoadedModel, TransformersChat
from cxr_auditor.grounding._common import ChatGrounder
from cxr_auditor.profiles import TransformersProfile

__all__ = ["TransformersGrounder"]


class TransformersGrounder(ChatGrounder):
    """A grounding profile with ``backend: transformers``.

    ``loaded`` lets callers share one loaded model between a grounder and another user of the
    same weights (cxr-auditor-v1 grounds and parses drafts).
    """

    def __init__(self, profile: TransformersProfile, loaded: LoadedModel | None = None) -> None:
        super().__init__(profile, TransformersChat(profile, loaded))
