"""Draft parsers: report text in, labelled statements with verbatim spans out.

``rules`` is the default (deterministic, CPU only); model-backed parsers live in
:mod:`cxr_auditor.drafts.llm`, over the chat layer (:mod:`cxr_auditor.chat`), which imports
torch and transformers only when a model is loaded.
"""

from __future__ import annotations

from typing import Any

from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.drafts.llm import LLMDraftParser, build_draft_parser
from cxr_auditor.drafts.rules import RulesDraftParser, parse_draft
from cxr_auditor.profiles import get_profile

__all__ = ["DraftParser", "RulesDraftParser", "get_parser", "parse_draft"]


def get_parser(name: str = "rules", **kwargs: Any) -> DraftParser:
    """The draft parser called ``name``.

    ``rules`` is built here. Any other name is looked up as a ``task: draft_parsing`` profile
    (``profiles_dir=`` adds a site folder) and built by :mod:`cxr_auditor.drafts.llm`; further
    keyword arguments (``chat=``) go to :class:`~cxr_auditor.drafts.llm.LLMDraftParser`.
    """
    profiles_dir = kwargs.pop("profiles_dir", None)
    if name == RulesDraftParser.name:
        if kwargs:
            raise TypeError(f"the rules parser takes no options, got {sorted(kwargs)}")
        return RulesDraftParser()
    profile = get_profile(name, profiles_dir)
    return LLMDraftParser(profile, **kwargs) if kwargs else build_draft_parser(profile)
