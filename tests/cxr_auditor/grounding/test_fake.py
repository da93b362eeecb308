"""Tests for cxr_auditor.grounding.fake: canned answers through the real parse and retry path."""

from __future__ import annotations

import pytest
from PIL import Image

from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.fake import (
    BRIGHT_ANSWER,
    DARK_ANSWER,
    RULES,
    STAND_IN,
    FakeGrounder,
    is_stand_in,
)
from cxr_auditor.labels import Label
from cxr_auditor.profiles import FakeProfile, parse_profile
from cxr_auditor.schema import GroundingState, ModelInfo

_VALID = '[{"label": "cardiomegaly", "box_2d": [0.4, 0.3, 0.8, 0.7]}]'


def _image(index: int = 0, grey: int = 0, geometry: Geometry | None = None) -> ImageInput:
    geometry = geometry or Geometry.identity(32, 32)
    picture = Image.new("L", (geometry.input_width, geometry.input_height), grey)
    return ImageInput(picture, index, geometry)


class TestFakeGrounder:
    def test_single_answer_for_every_image(self) -> None:
        results = FakeGrounder(_VALID).ground([_image(0), _image(4)])
        assert [r.findings[0].image_index for r in results] == [0, 4]
        assert [r.attempts for r in results] == [1, 1]
        assert results[0].findings[0].label is Label.CARDIOMEGALY

    def test_script_drives_the_retry_ladder(self) -> None:
        # image 0 answers garbage first; only it is asked again and gets the third answer.
        grounder = FakeGrounder(["garbage", _VALID, DARK_ANSWER])
        first, second = grounder.ground([_image(0), _image(1)])
        assert (first.state, first.attempts, first.findings[0].label) == (
            GroundingState.OK,
            2,
            Label.NO_FINDING,
        )
        assert (second.attempts, second.findings[0].label) == (1, Label.CARDIOMEGALY)

    def test_never_parseable_ends_failed_with_raw_text(self) -> None:
        [result] = FakeGrounder("no json here", max_attempts=3).ground([_image()])
        assert result.state is GroundingState.FAILED
        assert (result.raw_text, result.attempts) == ("no json here", 3)
        assert result.notes == ["unparseable_after_retries"]

    def test_empty_script_rejected(self) -> None:
        with pytest.raises(ValueError, match="at least one"):
            FakeGrounder([])

    def test_batch_sizes_recorded(self) -> None:
        grounder = FakeGrounder(_VALID)
        grounder.ground([_image(), _image(1), _image(2)])
        grounder.ground([_image()])
        assert grounder.batch_sizes == [3, 1]


class TestMeanBrightnessRule:
    def test_dark_and_bright_images_get_different_known_answers(self) -> None:
        rule = RULES["mean_brightness"]
        assert rule(_image(grey=20)) == DARK_ANSWER
        assert rule(_image(grey=200)) == BRIGHT_ANSWER

    def test_padding_does_not_count(self) -> None:
        # A bright 100x20 source letterboxed into 64x64: most of the input is black padding.
        geometry = Geometry.letterbox(100, 20, 64)
        picture = Image.new("L", (64, 64), 0)
        top = round(geometry.content_top)
        picture.paste(200, (0, top, 64, top + round(geometry.content_height)))
        assert RULES["mean_brightness"](ImageInput(picture, 0, geometry)) == BRIGHT_ANSWER

    def test_from_rule(self) -> None:
        grounder = FakeGrounder.from_rule("mean_brightness")
        labels = [[f.label for f in r.findings] for r in grounder.ground([_image(grey=10), _image(1, 250)])]
        assert labels == [[Label.NO_FINDING], [Label.PNEUMOTHORAX, Label.PLEURAL_EFFUSION]]

    def test_unknown_rule_names_the_known_ones(self) -> None:
        with pytest.raises(ValueError, match="mean_brightness"):
            FakeGrounder.from_rule("median")

    def test_from_profile_carries_provenance(self) -> None:
        profile = parse_profile(
            {"name": "fake", "task": "grounding", "backend": "fake", "generation": {"retries": 0}}
        )
        assert isinstance(profile, FakeProfile)
        grounder = FakeGrounder.from_profile(profile)
        assert grounder.info == ModelInfo(profile="fake", task="grounding", backend="fake", model_id=STAND_IN)
        assert is_stand_in([grounder.info])
        assert grounder.max_attempts == 1
