"""A grounder that answers with canned model text, through the real parsing and retry path.

For tests, dry runs and the agent's ``fake`` profile: no model, no GPU, but every answer goes
through :func:`~cxr_auditor.retry.run_batch_with_retry` and
:func:`~cxr_auditor.parsing.parse_grounding_output` exactly as a model's would, so a broken
canned answer exercises the retry ladder and ends as a ``failed`` result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from PIL import ImageStat

from cxr_auditor.errors import ParseError
from cxr_auditor.grounding.base import Grounder, ImageInput
from cxr_auditor.parsing import failed_grounding, parse_grounding_output
from cxr_auditor.retry import AttemptSettings, run_batch_with_retry
from cxr_auditor.schema import GroundingResult, ModelInfo

if TYPE_CHECKING:
    from cxr_auditor.profiles import FakeProfile

__all__ = ["BRIGHT_ANSWER", "DARK_ANSWER", "RULES", "STAND_IN", "FakeGrounder", "is_stand_in"]

Answers = Callable[[ImageInput], str] | str | list[str]

#: Answer of the ``mean_brightness`` rule for a dark image (mean grey level below 128).
DARK_ANSWER = json.dumps([{"label": "no_finding", "box_2d": None}])
#: Answer for a bright image: a pneumothorax on the image's right (the patient's LEFT on a PA
#: view) and a pleural effusion on the image's left (the patient's RIGHT).
BRIGHT_ANSWER = json.dumps(
    [
        {"label": "pneumothorax", "box_2d": [0.08, 0.58, 0.40, 0.92]},
        {"label": "pleural_effusion", "box_2d": [0.60, 0.06, 0.92, 0.40]},
    ]
)


def _mean_brightness(image: ImageInput) -> str:
    """DARK_ANSWER or BRIGHT_ANSWER by the mean grey level of the image content (padding
    excluded, so letterboxing does not change the answer)."""
    g = image.geometry
    content = image.image.convert("L").crop(
        (
            round(g.content_left),
            round(g.content_top),
            round(g.content_left + g.content_width),
            round(g.content_top + g.content_height),
        )
    )
    return BRIGHT_ANSWER if ImageStat.Stat(content).mean[0] >= 128 else DARK_ANSWER


#: Deterministic answer rules by name (:meth:`FakeGrounder.from_rule`).
RULES: dict[str, Callable[[ImageInput], str]] = {"mean_brightness": _mean_brightness}

#: The model name of every result this grounder produces, so the JSON (``models[].model_id``),
#: the SR (algorithm name) and the overlay (legend) all say it: its answers are canned.
STAND_IN = "stand-in, not a model"

_DEFAULT_INFO = ModelInfo(profile="fake", task="grounding", backend="fake", model_id=STAND_IN)


def is_stand_in(models: Iterable[ModelInfo]) -> bool:
    """True when a result's grounding came from this stand-in (backend ``fake``), not a model."""
    return any(m.task == "grounding" and m.backend == "fake" for m in models)


class FakeGrounder(Grounder):
    """Canned answers: one text for every image, a script, or a function of the image.

    ``answers`` as a ``str`` answers every image on every attempt. As a ``list[str]`` it is a
    script consumed in generation order (all images of a batch, then the retried ones); once
    used up, its last answer repeats. As a callable it is asked per image and attempt.
    ``batch_sizes`` records the number of images of each :meth:`ground` call.
    """

    def __init__(
        self, answers: Answers, info: ModelInfo | None = None, *, max_attempts: int = 3
    ) -> None:
        if isinstance(answers, list) and not answers:
            raise ValueError("answers: a script needs at least one answer")
        self.answers = answers
        self.info = info or _DEFAULT_INFO
        self.max_attempts = max_attempts
        self.batch_sizes: list[int] = []
        self._script_pos = 0

    @classmethod
    def from_rule(
        cls, name: str, info: ModelInfo | None = None, *, max_attempts: int = 3
    ) -> FakeGrounder:
        """A grounder answering by a deterministic rule of :data:`RULES` (``mean_brightness``).

        Raises:
            ValueError: no rule of that name.
        """
        try:
            rule = RULES[name]
        except KeyError:
            raise ValueError(f"unknown fake rule {name!r}; known: {', '.join(RULES)}") from None
        return cls(rule, info, max_attempts=max_attempts)

    @classmethod
    def from_profile(cls, profile: FakeProfile) -> FakeGrounder:
        """The grounder of a ``backend: fake`` profile: the ``mean_brightness`` rule."""
        info = ModelInfo(
            profile=profile.name,
            task="grounding",
            backend="fake",
            model_id=STAND_IN,
            revision=profile.revision,
        )
        return cls.from_rule("mean_brightness", info, max_attempts=profile.generation.max_attempts)

    def _answer(self, image: ImageInput) -> str:
        if isinstance(self.answers, str):
            return self.answers
        if isinstance(self.answers, list):
            text = self.answers[min(self._script_pos, len(self.answers) - 1)]
            self._script_pos += 1
            return text
        return self.answers(image)

    def ground(self, images: list[ImageInput]) -> list[GroundingResult]:
        """One result per image; unparseable answers become ``failed`` after the ladder."""
        self.batch_sizes.append(len(images))

        def generate(indices: list[int], settings: AttemptSettings) -> list[str]:
            return [self._answer(images[i]) for i in indices]

        def parse(index: int, text: str) -> GroundingResult:
            return parse_grounding_output(text, image_index=images[index].image_index)

        rows = run_batch_with_retry(generate, parse, len(images), self.max_attempts)
        return [
            failed_grounding(parsed, attempts)
            if isinstance(parsed, ParseError)
            else parsed.model_copy(update={"attempts": attempts})
            for parsed, attempts, _ in rows
        ]
