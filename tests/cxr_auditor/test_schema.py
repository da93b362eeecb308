"""Tests for cxr_auditor.schema: one TestX per model (construction, JSON round trip, one
failing case per rule), and the published JSON Schema kept in sync."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from cxr_auditor.labels import Label
from cxr_auditor.schema import (
    DISCLAIMER,
    AuditMode,
    AuditResult,
    Box,
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    ImageRef,
    Inputs,
    Laterality,
    ModelInfo,
    PixelBox,
    StudyKeys,
    UnmappedMention,
    json_schema_text,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "audit-result.schema.json"


def _round_trip(obj: BaseModel) -> None:
    assert type(obj).model_validate_json(obj.model_dump_json()) == obj


def _rejects(model: type[BaseModel], match: str, **fields: Any) -> None:
    with pytest.raises(ValidationError, match=match):
        model(**fields)


BOX = {"y0": 0.1, "x0": 0.2, "y1": 0.5, "x1": 0.6}


class TestBox:
    def test_construction_and_round_trip(self) -> None:
        box = Box(**BOX)
        assert box.as_list() == [0.1, 0.2, 0.5, 0.6]
        _round_trip(box)

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            ({"y0": -0.1}, "greater than or equal to 0"),
            ({"x1": 1.5}, "less than or equal to 1"),
            ({"y1": 0.1}, "non-zero area"),
            ({"x1": 0.2}, "non-zero area"),
            ({"z": 1}, "Extra inputs are not permitted"),
        ],
    )
    def test_rules(self, change: dict[str, float], match: str) -> None:
        _rejects(Box, match, **{**BOX, **change})

    def test_frozen(self) -> None:
        with pytest.raises(ValidationError, match="frozen"):
            Box(**BOX).y0 = 0.0


class TestPixelBox:
    def test_construction_and_round_trip(self) -> None:
        _round_trip(PixelBox(x0=1, y0=2, x1=30.5, y1=40))

    @pytest.mark.parametrize("change", [{"x1": 1}, {"y1": 1}])
    def test_rules(self, change: dict[str, float]) -> None:
        _rejects(PixelBox, "x1 > x0 and y1 > y0", **{"x0": 1, "y0": 2, "x1": 3, "y1": 4, **change})


class TestImageFinding:
    def test_construction_and_round_trip(self) -> None:
        finding = ImageFinding(
            label="pneumothorax",  # type: ignore[arg-type]
            image_index=1,
            box=Box(**BOX),
            pixel_box=PixelBox(x0=1, y0=2, x1=3, y1=4),
            laterality=Laterality.LEFT,
            confidence=0.5,
            evidence="edge",
        )
        assert finding.label is Label.PNEUMOTHORAX
        _round_trip(finding)

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            ({"label": "atelectasis"}, "label"),
            ({"image_index": -1}, "image_index"),
            ({"confidence": 1.2}, "confidence"),
            ({"laterality": "up"}, "laterality"),
            ({"status": "present"}, "Extra inputs"),
        ],
    )
    def test_rules(self, change: dict[str, object], match: str) -> None:
        _rejects(ImageFinding, match, **{"label": "cardiomegaly", **change})


DRAFT_TEXT = "No pneumothorax. Left effusion."


class TestDraftFinding:
    def test_construction_round_trip_and_check(self) -> None:
        finding = DraftFinding(
            label=Label.PLEURAL_EFFUSION, status=DraftStatus.PRESENT, span="Left effusion",
            start=17, end=30, laterality=Laterality.LEFT,
        )
        finding.check_against(DRAFT_TEXT)
        _round_trip(finding)

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            ({"start": 5, "end": 5, "span": ""}, "end > start"),
            ({"end": 20}, "span length"),
            ({"start": -1, "end": 14}, "start"),
            ({"status": "likely"}, "status"),
        ],
    )
    def test_rules(self, change: dict[str, object], match: str) -> None:
        base = {"label": "pneumothorax", "status": "absent", "span": "No pneumothorax", "start": 0, "end": 15}
        _rejects(DraftFinding, match, **{**base, **change})

    def test_check_against_rejects_a_span_not_at_its_offsets(self) -> None:
        finding = DraftFinding(label=Label.PNEUMOTHORAX, status=DraftStatus.ABSENT, span="No pneumothorax", start=1, end=16)
        with pytest.raises(ValueError, match="not the text at"):
            finding.check_against(DRAFT_TEXT)


class TestUnmappedMention:
    def test_construction_and_round_trip(self) -> None:
        _round_trip(UnmappedMention(term="atelectasis", status=DraftStatus.PRESENT, span="atelectasis", start=0, end=11))

    def test_rules(self) -> None:
        _rejects(UnmappedMention, "start", term="x", status="present", span="x", start=-1, end=0)


class TestFlag:
    def test_construction_and_round_trip(self) -> None:
        flag = Flag(kind=FlagKind.MISSING, label=Label.PNEUMOTHORAX, rationale="r", denied=True,
                    span="No pneumothorax", start=0, end=15, image_indices=[0, 2])
        _round_trip(flag)

    @pytest.mark.parametrize(
        ("fields", "match"),
        [
            ({"kind": "urgent", "denied": True}, "'denied'"),
            ({"kind": "missing", "missed": True}, "'missed'"),
            ({"kind": "missing", "label": "no_finding"}, "no_finding"),
            ({"kind": "wrong"}, "kind"),
        ],
    )
    def test_rules(self, fields: dict[str, object], match: str) -> None:
        _rejects(Flag, match, **{"label": "pneumothorax", "rationale": "r", **fields})


class TestImageRef:
    def test_construction_and_round_trip(self) -> None:
        _round_trip(ImageRef(index=0, image_id="1.2.3", sop_instance_uid="1.2.3", width=10, height=20, frame=1))

    @pytest.mark.parametrize(
        "change", [{"index": -1}, {"width": 0}, {"height": 0}]
    )
    def test_rules(self, change: dict[str, int]) -> None:
        _rejects(ImageRef, next(iter(change)), **{"index": 0, "image_id": "a", "width": 1, "height": 1, **change})


class TestInputs:
    def test_construction_and_round_trip(self) -> None:
        inputs = Inputs(images=[ImageRef(index=0, image_id="a", width=1, height=1)],
                        skipped_images=[{"image_id": "b", "reason": "lateral"}],
                        draft_file="d.txt", draft_sha256="0" * 64)
        _round_trip(inputs)

    def test_rules(self) -> None:
        _rejects(Inputs, "Extra inputs", drafts="x")


class TestModelInfo:
    def test_construction_and_round_trip(self) -> None:
        _round_trip(ModelInfo(profile="p", task="grounding", backend="fake", prompt_hash="ab" * 8))

    def test_rules(self) -> None:
        _rejects(ModelInfo, "task", profile="p", task="segmentation", backend="fake")


class TestGroundingResult:
    def test_construction_and_round_trip(self) -> None:
        result = GroundingResult(state=GroundingState.OK, findings=[ImageFinding(label=Label.CARDIOMEGALY)],
                                 unmapped=["atelectasis"], notes=["box_reordered"], attempts=2)
        _round_trip(result)

    @pytest.mark.parametrize("state", ["inconclusive", "failed", "skipped"])
    def test_only_ok_carries_findings(self, state: str) -> None:
        _rejects(GroundingResult, "cannot carry findings", state=state, findings=[ImageFinding(label=Label.CARDIOMEGALY)])

    def test_attempts_not_negative(self) -> None:
        _rejects(GroundingResult, "attempts", state="failed", attempts=-1)


class TestDraftResult:
    def test_construction_and_round_trip(self) -> None:
        finding = DraftFinding(label=Label.PNEUMOTHORAX, status=DraftStatus.ABSENT, span="No pneumothorax", start=0, end=15)
        _round_trip(DraftResult(state=DraftState.PARSED, parser="rules", findings=[finding]))

    def test_rules(self) -> None:
        _rejects(DraftResult, "state", state="maybe")


class TestStudyKeys:
    def test_construction_round_trip_and_masked_repr(self) -> None:
        keys = StudyKeys(study_instance_uid="1.2.3", accession_number="ACC-SENTINEL")
        _round_trip(keys)
        assert "ACC-SENTINEL" not in repr(keys) and "ACC-SENTINEL" not in str(keys)

    def test_rules(self) -> None:
        _rejects(StudyKeys, "Extra inputs", patient_name="x")


def _audit(**fields: Any) -> AuditResult:
    base: dict[str, Any] = {
        "grounding": GroundingResult(state=GroundingState.OK, findings=[ImageFinding(label=Label.PNEUMOTHORAX)]),
        "draft": DraftResult(state=DraftState.NONE),
        "mode": AuditMode.FULL,
        "comparator_version": "1.0.0",
    }
    return AuditResult(**{**base, **fields})


_MISSING = Flag(kind=FlagKind.MISSING, label=Label.PNEUMOTHORAX, rationale="r", denied=False)
_URGENT = Flag(kind=FlagKind.URGENT, label=Label.PNEUMOTHORAX, rationale="r")


class TestAuditResult:
    def test_construction_defaults_and_round_trip(self) -> None:
        result = _audit(flags=[_MISSING], timings={"grounding": 1.5}, notes=["n"])
        assert (result.schema_version, result.disclaimer, result.box_format) == (
            "1.0.0", DISCLAIMER, "normalized_y0x0y1x1",
        )
        assert result.flags_of(FlagKind.MISSING) == [_MISSING]
        assert AuditResult.model_validate_json(result.to_json()) == result
        assert "null" not in result.to_json()

    @pytest.mark.parametrize(
        ("fields", "match"),
        [
            ({"disclaimer": "Use freely."}, "research-only"),
            ({"mode": AuditMode.IMAGE_ONLY, "flags": [_MISSING]}, "cannot carry missing"),
            ({"mode": AuditMode.NO_FLAGS, "flags": [_URGENT]}, "cannot carry flags"),
            (
                {"inputs": Inputs(images=[ImageRef(index=0, image_id="a", width=1, height=1)]),
                 "grounding": GroundingResult(state=GroundingState.OK,
                                              findings=[ImageFinding(label=Label.PNEUMOTHORAX, image_index=1)])},
                "image_index out of range",
            ),
            ({"schema_version": "0.9"}, "schema_version"),
            ({"result_version": 0}, "result_version"),
            ({"box_format": "xyxy"}, "box_format"),
        ],
    )
    def test_rules(self, fields: dict[str, Any], match: str) -> None:
        with pytest.raises(ValidationError, match=match):
            _audit(**fields)


def test_published_json_schema_is_in_sync() -> None:
    # Regenerate: python -c "from cxr_auditor.schema import json_schema_text as t; print(t(), end='')"
    #   > docs/audit-result.schema.json
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text()
    assert json.loads(json_schema_text())["title"] == "AuditResult"
