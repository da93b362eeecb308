"""Grounders: images in, findings with boxes out. ``build_grounder`` picks one per profile."""

from __future__ import annotations

from cxr_auditor.errors import ProfileError
from cxr_auditor.grounding.base import Grounder, ImageInput
from cxr_auditor.grounding.fake import FakeGrounder
from cxr_auditor.grounding.openai import OpenAIGrounder
from cxr_auditor.grounding.transformers import TransformersGrounder
from cxr_auditor.profiles import FakeProfile, OpenAIProfile, Profile, TransformersProfile

__all__ = ["Grounder", "ImageInput", "build_grounder"]


def build_grounder(profile: Profile) -> Grounder:
    """The grounder a ``task: grounding`` profile describes (a transformers one loads its model
    now; torch and transformers are imported only then).

    Raises:
        ProfileError: the profile is not a grounding profile.
        ModelUnavailable: the model cannot be loaded (transformers backend).
    """
    if profile.task != "grounding":
        raise ProfileError(f"profile {profile.name!r} has task {profile.task!r}, not grounding")
    if isinstance(profile, TransformersProfile):
        return TransformersGrounder(profile)
    if isinstance(profile, OpenAIProfile):
        return OpenAIGrounder(profile)
    if isinstance(profile, FakeProfile):
        return FakeGrounder.from_profile(profile)
    raise ProfileError(f"profile {profile.name!r}: backend {profile.backend!r} cannot ground")
