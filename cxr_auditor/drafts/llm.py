"""Model-backed draft parsers: Nemotron-3 Nano, the v1 MedGemma fine-tune, any chat LLM.

The draft goes into the pinned draft-parsing prompt (:func:`cxr_auditor.prompts.build_draft_prompt`)
as one image-less user turn. The answer's reasoning block is stripped (also an unclosed or
truncated one), then :func:`cxr_auditor.parsing.parse_draft_output` keeps only elements whose
span re-anchors verbatim on the draft. The retry ladder re-asks only the drafts whose answer did
not parse; what still fails is ``unparseable``. Draft text never reaches the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cxr_auditor.chat import ChatBackend, ChatRequest, build_chat_backend
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.drafts.rules import RulesDraftParser
from cxr_auditor.errors import DraftInputError, ParseError, ProfileError
from cxr_auditor.parsing import parse_draft_output, strip_reasoning
from cxr_auditor.profiles import Profile, RulesProfile, model_info, profile_prompt
from cxr_auditor.prompts import CORRECTIVE_SUFFIX, build_draft_prompt
from cxr_auditor.retry import AttemptSettings, batched, run_batch_with_retry
from cxr_auditor.schema import DraftFinding, DraftResult, DraftState

__all__ = ["LLMDraftParser", "build_draft_parser"]

logger = logging.getLogger(__name__)


class LLMDraftParser(DraftParser):
    """Draft parser over a chat model named by a ``task: draft_parsing`` profile.

    ``chat`` may be given to share an already loaded backend; otherwise the profile's backend is
    built (a transformers model loads now).
    """

    def __init__(self, profile: Profile, chat: ChatBackend | None = None) -> None:
        if profile.task != "draft_parsing":
            raise ProfileError(f"profile {profile.name!r} has task {profile.task!r}, not draft_parsing")
        self.profile = profile
        self.name = profile.name
        self.chat = chat if chat is not None else build_chat_backend(profile)
        self.info = model_info(profile, profile_prompt(profile, "draft_parsing"))

    def parse(self, text: str) -> DraftResult:
        return self.parse_many([text])[0]

    def parse_many(self, texts: list[str]) -> list[DraftResult]:
        """Parse drafts in batches of ``generation.batch_size``; never raises on draft text."""
        results: dict[int, DraftResult] = {}
        prompts: dict[int, str] = {}
        for i, text in enumerate(texts):
            try:
                prompts[i] = build_draft_prompt(text)
            except DraftInputError:
                results[i] = DraftResult(
                    state=DraftState.UNPARSEABLE, parser=self.name, notes=["draft_empty"]
                )
        order = sorted(prompts)
        for chunk in batched(order, self.profile.generation.batch_size):
            for i, result in zip(chunk, self._parse_chunk(chunk, prompts, texts), strict=True):
                results[i] = result
        return [results[i] for i in range(len(texts))]

    def _parse_chunk(
        self, chunk: Sequence[int], prompts: dict[int, str], texts: list[str]
    ) -> list[DraftResult]:
        def generate(indices: list[int], settings: AttemptSettings) -> list[str]:
            suffix = CORRECTIVE_SUFFIX if settings.corrective_suffix else ""
            requests = [ChatRequest(prompts[chunk[k]] + suffix) for k in indices]
            return self.chat.generate(requests, settings)

        def parse(k: int, raw: str) -> tuple[list[DraftFinding], list[str]]:
            return parse_draft_output(strip_reasoning(raw), texts[chunk[k]])

        rows = run_batch_with_retry(
            generate, parse, len(chunk), self.profile.generation.max_attempts
        )
        out = []
        for parsed, attempts, _raw in rows:
            if isinstance(parsed, ParseError):
                logger.info("draft parser %s: answer unparseable after %d attempts", self.name, attempts)
                out.append(
                    DraftResult(
                        state=DraftState.UNPARSEABLE,
                        parser=self.name,
                        notes=["unparseable_after_retries", f"attempts:{attempts}"],
                    )
                )
                continue
            findings, notes = parsed
            out.append(
                DraftResult(
                    state=DraftState.PARSED,
                    parser=self.name,
                    findings=findings,
                    notes=[*notes, f"attempts:{attempts}"],
                )
            )
        return out

    def close(self) -> None:
        self.chat.close()


def build_draft_parser(profile: Profile) -> DraftParser:
    """The draft parser a ``task: draft_parsing`` profile describes: the rule-based parser for
    ``backend: rules``, an :class:`LLMDraftParser` for model backends."""
    if isinstance(profile, RulesProfile):
        return RulesDraftParser()
    return LLMDraftParser(profile)
