"""What every model-backed grounder shares: prompt, retry ladder and parsing.

:class:`ChatGrounder` runs a profile's prompt over a batch of images through any
:class:`~cxr_auditor.chat.ChatBackend` (in-process transformers or an OpenAI-compatible
server), re-generating only the images whose answer did not parse, and turns each answer into a
:class:`~cxr_auditor.schema.GroundingResult` (the pipeline maps boxes onto source pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from cxr_auditor.chat import ChatBackend, ChatRequest
from cxr_auditor.errors import ParseError
from cxr_auditor.grounding.base import Grounder, ImageInput
from cxr_auditor.grounding.report import ReportParser
from cxr_auditor.parsing import failed_grounding, parse_grounding_output
from cxr_auditor.profiles import Profile, model_info, profile_prompt
from cxr_auditor.prompts import CORRECTIVE_SUFFIX
from cxr_auditor.retry import AttemptSettings, batched, run_batch_with_retry
from cxr_auditor.schema import GroundingResult

logger = logging.getLogger(__name__)

_DEFAULT_PROMPTS = {"grounding_json": "grounding", "report_loc": "explain_my_xray"}

ParseFn = Callable[[str, int], GroundingResult]


def _json_parse(text: str, image_index: int) -> GroundingResult:
    return parse_grounding_output(text, image_index=image_index)


class ChatGrounder(Grounder):
    """A grounder over any chat backend, configured by a grounding profile."""

    def __init__(self, profile: Profile, chat: ChatBackend) -> None:
        self.profile = profile
        self.chat = chat
        parser = profile.output_parser
        self.prompt = profile_prompt(profile, _DEFAULT_PROMPTS[parser])
        self.parse_text: ParseFn = _json_parse
        if parser == "report_loc":
            self.parse_text = ReportParser(profile.labels).parse
        # The corrective suffix asks for a JSON list; report-style models were never taught that.
        self.corrective = parser == "grounding_json"
        self.info = model_info(profile, self.prompt)

    def _text(self, settings: AttemptSettings) -> str:
        return self.prompt + (CORRECTIVE_SUFFIX if settings.corrective_suffix and self.corrective else "")

    def ground(self, images: list[ImageInput]) -> list[GroundingResult]:
        """One result per image, batched ``generation.batch_size`` at a time."""
        size = self.profile.generation.batch_size
        return [r for chunk in batched(images, size) for r in self._ground_batch(chunk)]

    def _ground_batch(self, chunk: Sequence[ImageInput]) -> list[GroundingResult]:
        def generate(indices: list[int], settings: AttemptSettings) -> list[str]:
            text = self._text(settings)
            return self.chat.generate([ChatRequest(text, chunk[i].image) for i in indices], settings)

        def parse(index: int, raw: str) -> GroundingResult:
            return self.parse_text(raw, chunk[index].image_index)

        rows = run_batch_with_retry(
            generate, parse, len(chunk), self.profile.generation.max_attempts
        )
        results = []
        for parsed, attempts, _raw in rows:
            if isinstance(parsed, ParseError):
                logger.info("profile %s: answer unparseable after %d attempts", self.profile.name, attempts)
                results.append(failed_grounding(parsed, attempts))
            else:
                results.append(parsed.model_copy(update={"attempts": attempts}))
        return results

    def close(self) -> None:
        self.chat.close()
