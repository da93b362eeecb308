"""Presence, localisation and audit-flag evaluation (cxr_auditor.eval.grounding) on audits run
through the real pipeline with canned grounder answers, so every expected figure is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cxr_auditor.drafts import get_parser
from cxr_auditor.eval.grounding import (
    TruthBox,
    TruthCase,
    TruthError,
    evaluate,
    iou,
    load_truth,
    match_boxes,
    predicted_boxes,
)
from cxr_auditor.eval.stats import BinaryCounts, Rate, wilson_interval
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.fake import FakeGrounder
from cxr_auditor.labels import Label
from cxr_auditor.pipeline import AuditItem, Auditor
from cxr_auditor.schema import AuditResult, Box, FlagKind, ImageRef, PixelBox, StudyKeys

WIDTH, HEIGHT, INPUT = 200, 100, 64
GEOMETRY = Geometry.letterbox(WIDTH, HEIGHT, INPUT)


def _answer(*findings: tuple[str, list[float] | None]) -> str:
    return json.dumps([{"label": lab, "box_2d": box} for lab, box in findings])


def _model_box(source_box: list[float]) -> list[float]:
    """A box normalised on the source image, as the letterboxed model input sees it."""
    y0, x0, y1, x1 = source_box
    pb = PixelBox(x0=x0 * WIDTH, y0=y0 * HEIGHT, x1=x1 * WIDTH, y1=y1 * HEIGHT)
    return GEOMETRY.from_source(pb).as_list()


def _audit(answer: str, draft: str | None = None) -> AuditResult:
    auditor = Auditor(FakeGrounder(answer, max_attempts=1), get_parser("rules"))
    item = AuditItem(
        images=[ImageInput(Image.new("RGB", (INPUT, INPUT)), 0, GEOMETRY, True)],
        image_refs=[ImageRef(index=0, image_id="img", width=WIDTH, height=HEIGHT)],
        draft_text=draft,
        study=StudyKeys(),
    )
    return auditor.audit(item)


def _boxed_case(
    image: str, truth: list[float], predicted: list[float], label: Label = Label.PNEUMOTHORAX,
    predicted_label: Label | None = None,
) -> tuple[TruthCase, AuditResult]:
    """One image with one truth box of ``label`` and one predicted box (of ``predicted_label``,
    default the same label); both boxes normalised on the source image."""
    box = TruthBox.model_validate({"label": label, "box_2d": truth})
    case = TruthCase(image=image, labels=[label], boxes=[box])
    answer = _answer(((predicted_label or label).value, _model_box(predicted)))
    return case, _audit(answer)


def _box(y0: float, x0: float, y1: float, x1: float) -> Box:
    return Box(y0=y0, x0=x0, y1=y1, x1=x1)


class TestStats:
    def test_wilson_known_values(self) -> None:
        lo, hi = wilson_interval(5, 10) or (0, 0)
        assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
        lo, hi = wilson_interval(0, 5) or (1, 1)
        assert lo == 0.0 and round(hi, 4) == 0.4345

    def test_no_cases_is_undefined_not_zero(self) -> None:
        assert wilson_interval(0, 0) is None
        assert Rate(0, 0).value is None and Rate(0, 0).text() == "-"

    def test_successes_above_n_refused(self) -> None:
        with pytest.raises(ValueError, match="between 0 and n"):
            wilson_interval(3, 2)

    def test_small_counts_show_their_interval(self) -> None:
        assert Rate(3, 4).text() == "0.750 [0.30-0.95] n=4"
        assert Rate(300, 400).text() == "0.750"

    def test_binary_counts(self) -> None:
        c = BinaryCounts()
        for truth, pred in [(True, True), (True, False), (False, True), (False, False)]:
            c.add(truth, pred)
        assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 1)
        assert c.precision.value == 0.5 and c.recall.value == 0.5 and c.f1 == 0.5
        assert BinaryCounts(tn=4).f1 is None


class TestBoxes:
    def test_iou(self) -> None:
        a = _box(0, 0, 1, 0.5)
        assert iou(a, a) == 1.0
        assert iou(a, _box(0, 0.6, 1, 1)) == 0.0
        assert iou(a, _box(0, 0.25, 1, 0.75)) == pytest.approx(1 / 3)

    def test_greedy_one_to_one(self) -> None:
        truth = [_box(0, 0, 0.5, 0.5), _box(0.5, 0.5, 1, 1)]
        pred = [_box(0.5, 0.5, 1, 1), _box(0, 0, 0.5, 0.4), _box(0, 0, 0.5, 0.5)]
        matches = match_boxes(truth, pred)
        assert sorted((t, p) for t, p, _ in matches) == [(0, 2), (1, 0)]

    def test_predicted_boxes_are_on_the_source_image_despite_letterboxing(self) -> None:
        truth = [0.2, 0.5, 0.6, 0.9]
        (label, box), = predicted_boxes(_audit(_answer(("pneumothorax", _model_box(truth)))))
        assert label is Label.PNEUMOTHORAX
        assert box.as_list() == pytest.approx(truth, abs=1e-6)


def test_boxes_are_matched_within_each_image_never_across() -> None:
    """Image A has its truth on the right and its prediction on the left, image B the other
    way round: pooled matching would pair each prediction with the other image's truth."""
    right, left = [0.1, 0.6, 0.5, 0.9], [0.1, 0.1, 0.5, 0.4]
    cases = [_boxed_case("a", right, left), _boxed_case("b", left, right)]
    loc = evaluate(cases).as_dict()["localisation"]
    assert loc["truth_boxes"] == 2 and loc["predicted_boxes"] == 2
    assert loc["matched"] == 0 and loc["mean_iou"] == 0.0
    assert loc["iou0.3"]["hits"] == 0 and loc["iou0.5"]["recall"]["value"] == 0.0


def test_localisation_thresholds_and_mean_iou() -> None:
    truth_box = [0.2, 0.2, 0.6, 0.6]
    half = [0.2, 0.4, 0.6, 0.8]  # overlaps the truth by a third of their union
    nodule = Label.NODULE_MASS
    cases = [
        _boxed_case("a", truth_box, truth_box, nodule),
        _boxed_case("b", truth_box, half, nodule),
        # a box of another label never counts
        _boxed_case("c", truth_box, truth_box, nodule, Label.PLEURAL_EFFUSION),
    ]
    loc = evaluate(cases).as_dict()["localisation"]
    assert loc["iou0.3"]["hits"] == 2 and loc["iou0.5"]["hits"] == 1
    assert loc["iou0.5"]["recall"]["value"] == pytest.approx(1 / 3, abs=1e-4)
    assert loc["mean_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-3)
    assert loc["mean_iou_matched"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-3)


def test_presence_macro_and_urgent_recall() -> None:
    ptx, eff = Label.PNEUMOTHORAX, Label.PLEURAL_EFFUSION
    cases = [
        (TruthCase(image="1", labels=[ptx]), _audit(_answer(("pneumothorax", None)))),
        (TruthCase(image="2", labels=[ptx]), _audit(_answer(("no_finding", None)))),
        (TruthCase(image="3", labels=[]), _audit(_answer(("pneumothorax", None)))),
        (TruthCase(image="4", labels=[eff]), _audit(_answer(("pleural_effusion", None)))),
        (TruthCase(image="5", labels=[ptx]), _audit("not an answer")),  # grounding failed
    ]
    report = evaluate(cases)
    d = report.as_dict()
    assert d["cases"] == 5 and d["not_scored_grounding_not_ok"] == 1
    p = d["presence"]["pneumothorax"]
    assert (p["tp"], p["fp"], p["fn"], p["tn"]) == (1, 1, 1, 1)
    assert p["f1"] == 0.5
    assert d["presence"]["pleural_effusion"]["f1"] == 1.0
    nf = d["presence"]["no_finding"]
    assert (nf["tp"], nf["fp"], nf["fn"]) == (0, 1, 1)
    # undefined F1 (no positives at all) stays out of the macro
    assert d["presence_macro_positive_labels"]["f1"] == 0.75
    assert d["urgent_recall"]["successes"] == 1 and d["urgent_recall"]["n"] == 2
    assert d["urgent_recall"]["ci95"] == [0.0945, 0.9055]


def test_audit_flags_from_labelled_draft_cases() -> None:
    ptx_answer = _answer(("pneumothorax", [0.3, 0.6, 0.6, 0.9]))
    cases = [
        (TruthCase(image="1", labels=[Label.PNEUMOTHORAX], draft="No pneumothorax.",
                   flags=[{"kind": "missing", "label": "pneumothorax"},
                          {"kind": "urgent", "label": "pneumothorax"}]),
         _audit(ptx_answer, "No pneumothorax.")),
        (TruthCase(image="2", labels=[Label.PNEUMOTHORAX], draft="Right pneumothorax.",
                   flags=[{"kind": "unsupported", "label": "cardiomegaly"}]),
         _audit(ptx_answer, "Right pneumothorax.")),
        (TruthCase(image="3", labels=[Label.PNEUMOTHORAX]), _audit(ptx_answer, "Cardiomegaly.")),
    ]
    flags = evaluate(cases).as_dict()["audit_flags"]
    assert flags["cases"] == 2
    assert flags["exact_match"]["successes"] == 1
    missing = flags["by_kind"][FlagKind.MISSING.value]
    assert (missing["tp"], missing["fp"], missing["fn"]) == (1, 0, 0)
    unsupported = flags["by_kind"]["unsupported"]
    assert (unsupported["tp"], unsupported["fn"]) == (0, 1)


def test_tables_are_readable() -> None:
    report = evaluate([(TruthCase(image="1", labels=[Label.PNEUMOTHORAX]),
                        _audit(_answer(("pneumothorax", None))))])
    titles = [title for title, _, _ in report.tables()]
    assert titles[0].startswith("Presence (1 cases")
    rows = {row[0]: row for row in report.tables()[0][2]}
    assert rows["pneumothorax"][5] == "1.000 [0.21-1.00] n=1"


class TestLoadTruth:
    def test_reads_lines_and_skips_blank(self, tmp_path: Path) -> None:
        path = tmp_path / "truth.jsonl"
        path.write_text(
            '{"image": "a.png", "labels": ["pneumothorax"]}\n\n'
            '{"image": "b.png", "labels": [], "flags": []}\n'
        )
        cases = load_truth(path)
        assert [c.image for c in cases] == ["a.png", "b.png"]
        assert cases[1].flags == [] and cases[0].flags is None

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ('{"image": "a", "labels": ["fracture"]}', "line 1: labels.0"),
            ('{"image": "a", "extra": 1}', "line 1: extra"),
            ("{not json", "line 1: not JSON"),
            ('{"image": "a", "boxes": [{"label": "nodule_mass", "box_2d": [0.5, 0, 0.1, 1]}]}',
             "line 1: boxes.0: Value error, box must have y1 > y0"),
        ],
    )
    def test_bad_lines_name_line_and_field(self, tmp_path: Path, line: str, message: str) -> None:
        path = tmp_path / "truth.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(TruthError, match=message):
            load_truth(path)

    def test_duplicate_image_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "truth.jsonl"
        path.write_text('{"image": "a"}\n{"image": "a"}\n')
        with pytest.raises(TruthError, match="listed twice"):
            load_truth(path)
