"""Tests of the grounder over the in-process transformers backend, on the trained tiny Gemma 3
(CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_auditor.chat import ChatRequest
from cxr_auditor.chat.transformers import TransformersChat
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding import build_grounder
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.transformers import TransformersGrounder
from cxr_auditor.labels import Label
from cxr_auditor.prompts import CORRECTIVE_SUFFIX
from cxr_auditor.retry import AttemptSettings
from cxr_auditor.schema import GroundingState
from tests.support import tinymodels as tm
from tests.support.model_fixtures import GREY, transformers_profile


def _image(value: int, index: int = 0, size: int = tm.IMAGE_SIZE) -> ImageInput:
    return ImageInput(tm.solid_image(value, size), index, Geometry.identity(size, size))


class _Spy:
    """Wraps a chat backend and records every batch it is asked to generate."""

    def __init__(self, inner: TransformersChat) -> None:
        self.inner = inner
        self.calls: list[tuple[list[ChatRequest], AttemptSettings]] = []

    def generate(self, requests: list[ChatRequest], settings: AttemptSettings) -> list[str]:
        self.calls.append((requests, settings))
        return self.inner.generate(requests, settings)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
class TestTrainedGrounder:
    """The trained tiny model answers black → no_finding, white → pneumothorax with a box."""

    @pytest.mark.parametrize("shipped", ["cxr-auditor-v2", "cxr-auditor-v1"])
    def test_batch_of_images_yields_each_images_answer(self, trained_gemma: Path, shipped: str) -> None:
        grounder = build_grounder(transformers_profile(shipped, trained_gemma, prompt="explain_my_xray"))
        assert isinstance(grounder, TransformersGrounder)
        results = grounder.ground([_image(0, 0), _image(255, 1), _image(0, 2, size=96)])
        assert [r.state for r in results] == [GroundingState.OK] * 3
        assert [f.label for f in results[0].findings] == [Label.NO_FINDING]
        (ptx,) = results[1].findings
        assert ptx.label is Label.PNEUMOTHORAX and ptx.image_index == 1
        assert ptx.box is not None and ptx.box.as_list() == pytest.approx([0.1, 0.6, 0.5, 0.9])
        assert results[2].findings[0].image_index == 2 and results[0].attempts == 1
        assert grounder.info.profile == shipped and grounder.info.prompt_hash

    def test_only_failed_images_are_regenerated_with_the_ladder(self, trained_gemma: Path) -> None:
        # 64 new tokens hold the JSON answers and keep the failing rungs short.
        profile = transformers_profile(
            "cxr-auditor-v2",
            trained_gemma,
            prompt="explain_my_xray",
            generation={"max_new_tokens": 64, "retries": 2},
        )
        spy = _Spy(TransformersChat(profile))
        grounder = TransformersGrounder(profile, spy.inner.loaded)
        grounder.chat = spy
        # The grey image gets the report answer: not JSON, so it climbs the whole ladder.
        results = grounder.ground([_image(0, 0), _image(GREY, 1)])
        assert [len(reqs) for reqs, _ in spy.calls] == [2, 1, 1]
        (_, first), (retry, second), (_, third) = spy.calls
        assert not first.do_sample and not second.do_sample and third.do_sample
        assert retry[0].text.endswith(CORRECTIVE_SUFFIX)
        assert results[0].state is GroundingState.OK and results[0].attempts == 1
        assert results[1].state is GroundingState.FAILED and results[1].attempts == 3
        assert results[1].raw_text and results[1].notes == ["unparseable_after_retries"]


