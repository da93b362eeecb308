"""Classification profiles (dsa-patency): one image in, patent / blocked / uncertain out.

The DSA adapter is asked a constrained question, but a language model may still answer in a
sentence. :func:`interpret_patency` reads the answer conservatively: negations of a blocked
vessel ("not blocked", "no occlusion") count as patent, negations of a patent one ("not patent")
as blocked, a total stenosis ("stenosis 100%") as blocked. Both, neither, or a hedge ("may be",
"cannot exclude") give ``uncertain``. ``blocked`` is URGENT; ``uncertain`` goes to manual review
and is never reported as patent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cxr_auditor.chat import ChatBackend, ChatRequest, build_chat_backend
from cxr_auditor.errors import ParseError, ProfileError
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.parsing import RAW_TEXT_LIMIT, strip_reasoning
from cxr_auditor.profiles import Profile, model_info, profile_prompt
from cxr_auditor.retry import AttemptSettings, batched, run_batch_with_retry

__all__ = ["ClassificationResult", "PatencyClassifier", "interpret_patency", "summarize"]

logger = logging.getLogger(__name__)

PatencyLabel = Literal["patent", "blocked", "uncertain"]

_PATENT_TERMS = ("patent", "open", "perfused", "recanalized", "recanalised")
_BLOCKED_TERMS = ("blocked", "occluded", "occlusion", "obstructed", "obstruction", "blockage")
_NEGATOR = r"\b(?:not|no|without|non|absence\s+of)[\s-]+(?:[a-z]+\s+){0,3}?"
_TOTAL_STENOSIS_RE = re.compile(
    r"\b(?:100\s*%\s*stenosis|stenosis\D{0,12}100\s*%|(?:complete|total)\s+(?:stenosis|occlusion))"
)
_HEDGE_RE = re.compile(
    r"\b(?:possibl[ey]|may|might|cannot\s+(?:be\s+)?exclude[d]?|can't\s+exclude|suspect\w*|"
    r"likely|probabl[ey]|uncertain|unclear|indeterminate|equivocal|questionabl[ey])\b"
)


class ClassificationResult(BaseModel):
    """One image's classification. ``urgent`` when blocked; ``needs_review`` when uncertain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: PatencyLabel
    needs_review: bool
    urgent: bool
    image_index: int = Field(default=0, ge=0)
    raw_text: str = ""
    notes: list[str] = Field(default_factory=list)


def _terms(words: tuple[str, ...]) -> str:
    return r"(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b"


def interpret_patency(
    text: str, extra_terms: dict[str, str] | None = None
) -> tuple[PatencyLabel, list[str]]:
    """Read a possibly verbose answer as ``patent``, ``blocked`` or ``uncertain`` (with reason
    codes). ``extra_terms`` maps more answer words onto ``patent`` / ``blocked``."""
    answer = strip_reasoning(text).lower()
    extra = {k.lower(): v for k, v in (extra_terms or {}).items()}
    patent_terms = _PATENT_TERMS + tuple(k for k, v in extra.items() if v == "patent")
    blocked_terms = _BLOCKED_TERMS + tuple(k for k, v in extra.items() if v == "blocked")
    notes: list[str] = []
    if not answer.strip():
        return "uncertain", ["answer_empty"]
    if _HEDGE_RE.search(answer):
        return "uncertain", ["answer_hedged"]
    patent = blocked = False
    # Negated phrases decide first and are blanked, so "not blocked" never reads as "blocked".
    neg_blocked = re.compile(_NEGATOR + _terms(blocked_terms + ("stenosis", "stenoses")))
    neg_patent = re.compile(_NEGATOR + _terms(patent_terms))
    if neg_blocked.search(answer):
        patent = True
        answer = neg_blocked.sub(" ", answer)
    if neg_patent.search(answer):
        blocked = True
        answer = neg_patent.sub(" ", answer)
    if _TOTAL_STENOSIS_RE.search(answer):
        blocked = True
    if re.search(r"\b" + _terms(blocked_terms), answer):
        blocked = True
    if re.search(r"\b" + _terms(patent_terms), answer):
        patent = True
    if patent and blocked:
        notes.append("answer_contradictory")
        return "uncertain", notes
    if not (patent or blocked):
        return "uncertain", ["answer_without_label"]
    return ("blocked" if blocked else "patent"), notes


def _result(label: PatencyLabel, notes: list[str], raw: str, index: int) -> ClassificationResult:
    return ClassificationResult(
        label=label,
        needs_review=label == "uncertain",
        urgent=label == "blocked",
        image_index=index,
        raw_text=raw[:RAW_TEXT_LIMIT],
        notes=notes,
    )


def summarize(profile: str, results: list[ClassificationResult]) -> dict[str, Any]:
    """The study-level value for ``AuditResult.classification``: ``blocked`` when any image is
    blocked, else ``uncertain`` when any is uncertain (or there is none), else ``patent``; the
    per-image results follow under ``images``."""
    labels = {r.label for r in results}
    label: PatencyLabel = (
        "blocked" if "blocked" in labels else "patent" if labels == {"patent"} else "uncertain"
    )
    return {
        "profile": profile,
        "label": label,
        "urgent": label == "blocked",
        "needs_review": label == "uncertain",
        "images": [r.model_dump() for r in results],
    }


class PatencyClassifier:
    """Runs a ``task: classification`` profile over images (batched, retry ladder)."""

    def __init__(self, profile: Profile, chat: ChatBackend | None = None) -> None:
        if profile.task != "classification":
            raise ProfileError(f"profile {profile.name!r} has task {profile.task!r}, not classification")
        self.profile = profile
        self.chat = chat if chat is not None else build_chat_backend(profile)
        self.prompt = profile_prompt(profile, "dsa_patency")
        self.info = model_info(profile, self.prompt)

    def classify(self, images: list[ImageInput]) -> list[ClassificationResult]:
        """One result per image, in order. An answer that stays uncertain after the ladder is
        ``uncertain`` with ``needs_review``; a backend failure raises BackendError."""
        size = self.profile.generation.batch_size
        return [r for chunk in batched(images, size) for r in self._classify_batch(chunk)]

    def _classify_batch(self, chunk: Sequence[ImageInput]) -> list[ClassificationResult]:
        def generate(indices: list[int], settings: AttemptSettings) -> list[str]:
            # No corrective suffix: it asks for JSON; later rungs only add sampling.
            return self.chat.generate([ChatRequest(self.prompt, chunk[i].image) for i in indices], settings)

        def parse(index: int, raw: str) -> ClassificationResult:
            label, notes = interpret_patency(raw, self.profile.labels)
            if label == "uncertain":
                raise ParseError(notes[0], raw_text=raw)
            return _result(label, notes, raw, chunk[index].image_index)

        rows = run_batch_with_retry(generate, parse, len(chunk), self.profile.generation.max_attempts)
        out = []
        for image, (parsed, attempts, raw) in zip(chunk, rows, strict=True):
            if isinstance(parsed, ParseError):
                logger.info("profile %s: uncertain answer, routed to review", self.profile.name)
                parsed = _result("uncertain", [str(parsed), f"attempts:{attempts}"], raw, image.image_index)
            out.append(parsed)
        return out

    def close(self) -> None:
        self.chat.close()
