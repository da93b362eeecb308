"""Tests for cxr_auditor.pipeline: batching, box placement, merging, draft handling, results."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.errors import BackendError
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding.base import Grounder, ImageInput
from cxr_auditor.grounding.fake import BRIGHT_ANSWER, DARK_ANSWER, FakeGrounder
from cxr_auditor.labels import Label
from cxr_auditor.parsing import parse_draft_output
from cxr_auditor.pipeline import (
    AuditItem,
    Auditor,
    box_laterality,
    merge_grounding,
    place_findings,
)
from cxr_auditor.schema import (
    AuditMode,
    AuditResult,
    Box,
    DraftResult,
    DraftState,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    ImageRef,
    Laterality,
    ModelInfo,
    PixelBox,
    StudyKeys,
)

_PARSER_INFO = ModelInfo(profile="scripted", task="draft_parsing", backend="fake")


class ScriptedDraftParser(DraftParser):
    """Answers every draft with the same model text, through the real draft-output parser."""

    name = "scripted"
    info = _PARSER_INFO

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[int] = []

    def parse(self, text: str) -> DraftResult:
        findings, notes = parse_draft_output(self.answer, text)
        return DraftResult(state=DraftState.PARSED, parser=self.name, findings=findings, notes=notes)

    def parse_many(self, texts: list[str]) -> list[DraftResult]:
        self.calls.append(len(texts))
        return super().parse_many(texts)


def _image(
    index: int,
    grey: int,
    *,
    size: tuple[int, int] = (100, 80),
    geometry: Geometry | None = None,
    left_on_right: bool | None = True,
) -> ImageInput:
    geometry = geometry or Geometry.identity(*size)
    picture = Image.new("L", (geometry.input_width, geometry.input_height), grey)
    return ImageInput(picture, index, geometry, left_on_right)


def _item(*images: ImageInput, draft: str | None = None) -> AuditItem:
    refs = [
        ImageRef(
            index=i,
            image_id=f"img{i}",
            width=images[i].geometry.source_width,
            height=images[i].geometry.source_height,
        )
        for i in range(len(images))
    ]
    return AuditItem(list(images), refs, draft, StudyKeys(study_instance_uid="1.2.3"))


BRIGHT, DARK = 220, 20
PTX_LEFT_DRAFT = "Small left pneumothorax. No effusion."
PTX_LEFT_ANSWER = json.dumps(
    [
        {"label": "pneumothorax", "status": "present", "span": "Small left pneumothorax"},
        {"label": "pleural_effusion", "status": "absent", "span": "No effusion"},
    ]
)


def _summary(result: AuditResult) -> list[tuple[str, str]]:
    return [(f.kind.value, f.label.value) for f in result.flags]


class TestBoxLaterality:
    @pytest.mark.parametrize(
        ("x0", "x1", "left_on_right", "side"),
        [
            (60, 90, True, Laterality.LEFT),
            (10, 40, True, Laterality.RIGHT),
            (60, 90, False, Laterality.RIGHT),
            (10, 40, False, Laterality.LEFT),
            (60, 90, None, None),
            (40, 58, True, None),  # centre 49: inside the midline band
            (46, 64, True, Laterality.LEFT),  # centre 55: just outside it
        ],
    )
    def test_side(self, x0: float, x1: float, left_on_right: bool | None, side: object) -> None:
        box = PixelBox(x0=x0, y0=0, x1=x1, y1=10)
        assert box_laterality(box, 100, left_on_right) is side


class TestPlaceFindings:
    def test_pixel_box_follows_letterbox_geometry(self) -> None:
        geometry = Geometry.letterbox(200, 100, 64)  # content rows 16..48 of the input
        image = _image(3, BRIGHT, geometry=geometry)
        result = GroundingResult(
            state=GroundingState.OK,
            findings=[ImageFinding(label=Label.NODULE_MASS, box=Box(y0=0.25, x0=0.5, y1=0.75, x1=1.0))],
        )
        [finding] = place_findings(result, image).findings
        assert finding.image_index == 3
        assert finding.pixel_box == PixelBox(x0=100, y0=0, x1=200, y1=100)
        assert finding.laterality is Laterality.LEFT

    def test_box_in_padding_keeps_normalised_box_and_notes(self) -> None:
        image = _image(0, BRIGHT, geometry=Geometry.letterbox(200, 100, 64))
        box = Box(y0=0.0, x0=0.1, y1=0.2, x1=0.4)
        result = GroundingResult(state=GroundingState.OK, findings=[ImageFinding(label=Label.NODULE_MASS, box=box)])
        placed = place_findings(result, image)
        assert placed.findings[0].box == box
        assert (placed.findings[0].pixel_box, placed.findings[0].laterality) == (None, None)
        assert placed.notes == ["box_in_padding"]

    def test_boxless_finding_keeps_its_stated_side(self) -> None:
        finding = ImageFinding(label=Label.PLEURAL_EFFUSION, laterality=Laterality.LEFT)
        result = GroundingResult(state=GroundingState.OK, findings=[finding])
        [placed] = place_findings(result, _image(1, BRIGHT)).findings
        assert (placed.laterality, placed.image_index) == (Laterality.LEFT, 1)


class TestMergeGrounding:
    def test_states(self) -> None:
        ok = GroundingResult(state=GroundingState.OK, findings=[ImageFinding(label=Label.CARDIOMEGALY)])
        inc = GroundingResult(state=GroundingState.INCONCLUSIVE, notes=["empty_list"])
        failed = GroundingResult(state=GroundingState.FAILED, raw_text="junk", attempts=3)
        imgs = [_image(0, DARK), _image(1, DARK)]
        assert merge_grounding([inc, ok], imgs).state is GroundingState.OK
        assert merge_grounding([failed, inc], imgs).state is GroundingState.INCONCLUSIVE
        both_failed = merge_grounding([failed, failed], imgs)
        assert (both_failed.state, both_failed.raw_text, both_failed.attempts) == (
            GroundingState.FAILED,
            "junk",
            3,
        )
        assert merge_grounding([], []).state is GroundingState.SKIPPED
        skipped = GroundingResult(state=GroundingState.SKIPPED)
        assert merge_grounding([skipped, skipped], imgs).state is GroundingState.SKIPPED
        assert merge_grounding([skipped, failed], imgs).state is GroundingState.FAILED

    def test_notes_prefixed_per_image(self) -> None:
        ok = GroundingResult(state=GroundingState.OK, findings=[ImageFinding(label=Label.CARDIOMEGALY)], notes=["box_reordered"])
        failed = GroundingResult(state=GroundingState.FAILED, notes=["unparseable_after_retries"], raw_text="x")
        merged = merge_grounding([ok, failed], [_image(0, DARK), _image(1, DARK)])
        assert merged.notes == [
            "image0:box_reordered",
            "image1:unparseable_after_retries",
            "image1:grounding_failed",
        ]
        assert merged.raw_text is None  # the study did not fail

    def test_no_finding_on_one_view_yields_to_positive_on_another(self) -> None:
        normal = GroundingResult(state=GroundingState.OK, findings=[ImageFinding(label=Label.NO_FINDING)])
        positive = GroundingResult(
            state=GroundingState.OK, findings=[ImageFinding(label=Label.PNEUMOTHORAX, image_index=1)]
        )
        merged = merge_grounding([normal, positive], [_image(0, DARK), _image(1, DARK)])
        assert [f.label for f in merged.findings] == [Label.PNEUMOTHORAX]
        assert "no_finding_with_positives:positives_kept" in merged.notes


class TestAuditor:
    def test_one_grounder_call_for_all_images_of_all_items(self) -> None:
        grounder = FakeGrounder.from_rule("mean_brightness")
        parser = ScriptedDraftParser("[]")
        items = [
            _item(_image(0, DARK), _image(1, BRIGHT), draft="Normal."),
            _item(_image(0, DARK)),
            _item(_image(0, BRIGHT), draft="Lungs clear."),
        ]
        results = Auditor(grounder, parser).audit_batch(items)
        assert grounder.batch_sizes == [4]
        assert parser.calls == [2]
        assert [r.grounding.findings[0].label for r in results] == [
            Label.PNEUMOTHORAX,
            Label.NO_FINDING,
            Label.PNEUMOTHORAX,
        ]
        assert [f.image_index for f in results[0].grounding.findings] == [1, 1]

    def test_full_audit_flags_and_sides(self) -> None:
        auditor = Auditor(FakeGrounder(BRIGHT_ANSWER), ScriptedDraftParser(PTX_LEFT_ANSWER))
        result = auditor.audit(_item(_image(0, BRIGHT), draft=PTX_LEFT_DRAFT))
        assert result.mode is AuditMode.FULL
        assert _summary(result) == [("missing", "pleural_effusion"), ("urgent", "pneumothorax")]
        assert result.flags_of(FlagKind.MISSING)[0].denied is True
        assert result.flags_of(FlagKind.URGENT)[0].missed is False
        sides = {f.label: f.laterality for f in result.grounding.findings}
        assert sides == {Label.PNEUMOTHORAX: Laterality.LEFT, Label.PLEURAL_EFFUSION: Laterality.RIGHT}
        pixel = result.grounding.findings[0].pixel_box
        assert pixel is not None
        assert [pixel.x0, pixel.y0, pixel.x1, pixel.y1] == pytest.approx([58, 6.4, 92, 32])
        assert [m.profile for m in result.models] == ["fake", "scripted"]

    def test_flipped_image_turns_the_side_and_flags_laterality(self) -> None:
        auditor = Auditor(FakeGrounder(BRIGHT_ANSWER), ScriptedDraftParser(PTX_LEFT_ANSWER))
        result = auditor.audit(_item(_image(0, BRIGHT, left_on_right=False), draft=PTX_LEFT_DRAFT))
        assert ("laterality", "pneumothorax") in _summary(result)
        assert result.flags_of(FlagKind.LATERALITY)[0].span == "Small left pneumothorax"

    @pytest.mark.parametrize("draft", [None, "", "  \n\t"])
    def test_no_draft_is_image_only(self, draft: str | None) -> None:
        parser = ScriptedDraftParser(PTX_LEFT_ANSWER)
        result = Auditor(FakeGrounder(BRIGHT_ANSWER), parser).audit(_item(_image(0, BRIGHT), draft=draft))
        assert result.draft.state is DraftState.NONE
        assert result.draft.notes == ["no_draft"]
        assert result.mode is AuditMode.IMAGE_ONLY
        assert _summary(result) == [("urgent", "pneumothorax")]
        assert result.notes == ["draft_none:image_only"]
        assert parser.calls == []
        assert [m.profile for m in result.models] == ["fake"]

    def test_draft_without_parser_is_image_only_and_says_why(self) -> None:
        result = Auditor(FakeGrounder(BRIGHT_ANSWER), None).audit(_item(_image(0, BRIGHT), draft="x"))
        assert (result.mode, result.draft.notes) == (AuditMode.IMAGE_ONLY, ["no_draft_parser"])

    def test_failed_grounding_gives_no_flags_and_keeps_raw_text(self) -> None:
        grounder = FakeGrounder("I cannot help with that.", max_attempts=2)
        result = Auditor(grounder, ScriptedDraftParser(PTX_LEFT_ANSWER)).audit(
            _item(_image(0, BRIGHT), draft=PTX_LEFT_DRAFT)
        )
        assert (result.mode, result.flags) == (AuditMode.NO_FLAGS, [])
        assert result.grounding.state is GroundingState.FAILED
        assert result.grounding.raw_text == "I cannot help with that."
        assert result.grounding.attempts == 2
        assert result.notes == ["grounding_failed:no_flags"]

    def test_one_bad_view_does_not_sink_the_study(self) -> None:
        def answer(image: ImageInput) -> str:
            return BRIGHT_ANSWER if image.image_index == 0 else "garbage"

        result = Auditor(FakeGrounder(answer), None).audit(_item(_image(0, BRIGHT), _image(1, BRIGHT)))
        assert result.grounding.state is GroundingState.OK
        assert "image1:grounding_failed" in result.grounding.notes
        assert {f.image_index for f in result.grounding.findings} == {0}

    def test_empty_batch_calls_nothing(self) -> None:
        grounder = FakeGrounder(DARK_ANSWER)
        parser = ScriptedDraftParser("[]")
        assert Auditor(grounder, parser).audit_batch([]) == []
        assert (grounder.batch_sizes, parser.calls) == ([], [])

    def test_item_without_images_is_skipped(self) -> None:
        grounder = FakeGrounder(DARK_ANSWER)
        result = Auditor(grounder, None).audit(_item())
        assert (result.grounding.state, result.mode) == (GroundingState.SKIPPED, AuditMode.NO_FLAGS)
        assert grounder.batch_sizes == []

    def test_timings_and_provenance(self) -> None:
        result = Auditor(FakeGrounder(DARK_ANSWER), ScriptedDraftParser("[]")).audit(
            _item(_image(0, DARK), draft="Normal.")
        )
        assert set(result.timings) == {"grounding_ms", "draft_parsing_ms", "comparison_ms"}
        assert all(v >= 0 for v in result.timings.values())
        assert result.comparator_version == "1.0.0"
        assert result.inputs.images[0].image_id == "img0"

    def test_urgent_set_from_configured_strings(self) -> None:
        auditor = Auditor(FakeGrounder(BRIGHT_ANSWER), None, urgent=["pleural_effusion"])
        assert _summary(auditor.audit(_item(_image(0, BRIGHT)))) == [("urgent", "pleural_effusion")]
        with pytest.raises(ValueError):
            Auditor(FakeGrounder(BRIGHT_ANSWER), None, urgent=["no_finding"])

    def test_backend_error_propagates(self) -> None:
        class Broken(Grounder):
            info = ModelInfo(profile="broken", task="grounding", backend="fake")

            def ground(self, images: list[ImageInput]) -> list[GroundingResult]:
                raise BackendError("server down")

        with pytest.raises(BackendError, match="server down"):
            Auditor(Broken(), None).audit(_item(_image(0, DARK)))

    def test_wrong_result_count_from_grounder_is_a_backend_error(self) -> None:
        class Short(Grounder):
            info = ModelInfo(profile="short", task="grounding", backend="fake")

            def ground(self, images: list[ImageInput]) -> list[GroundingResult]:
                return []

        with pytest.raises(BackendError, match="0 results for 1 images"):
            Auditor(Short(), None).audit(_item(_image(0, DARK)))

    def test_close_releases_the_grounder_and_the_llm_parser_even_if_one_fails(self) -> None:
        """The LLM parser's chat backend holds a model or client: closing the auditor frees it."""
        from cxr_auditor.drafts.llm import LLMDraftParser
        from cxr_auditor.profiles import get_profile
        from tests.support.model_fixtures import ScriptedChat

        closed: list[str] = []

        class Chat(ScriptedChat):
            def close(self) -> None:
                closed.append("parser")

        class Grounding(FakeGrounder):
            def close(self) -> None:
                closed.append("grounder")
                raise BackendError("server gone")

        parser = LLMDraftParser(get_profile("nemotron-3-nano"), Chat([]))
        with pytest.raises(BackendError, match="server gone"):
            Auditor(Grounding(DARK_ANSWER), parser).close()
        assert closed == ["grounder", "parser"]

    def test_result_survives_a_json_round_trip(self) -> None:
        auditor = Auditor(FakeGrounder(BRIGHT_ANSWER), ScriptedDraftParser(PTX_LEFT_ANSWER))
        result = auditor.audit(_item(_image(0, BRIGHT), draft=PTX_LEFT_DRAFT))
        assert AuditResult.model_validate_json(result.to_json()) == result


class TestAuditItem:
    def test_image_index_must_point_into_refs(self) -> None:
        with pytest.raises(ValueError, match="image_refs"):
            AuditItem([_image(2, DARK)], [], None, StudyKeys())

    def test_repr_hides_draft_and_study(self) -> None:
        item = _item(_image(0, DARK), draft="SENTINEL draft text")
        item.study = StudyKeys(accession_number="ACC-SENTINEL")
        assert "SENTINEL" not in repr(item)
