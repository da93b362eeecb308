"""What changed between two audits of one study (cxr_auditor.eval.diff)."""

from __future__ import annotations

from cxr_auditor.eval.diff import DiffSummary, diff_results
from cxr_auditor.labels import Label
from cxr_auditor.schema import (
    AuditMode,
    AuditResult,
    Box,
    DraftResult,
    DraftState,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    Laterality,
)


def _result(flags: list[tuple[FlagKind, Label]], findings: list[tuple[Label, Laterality | None]],
            state: GroundingState = GroundingState.OK) -> AuditResult:
    return AuditResult(
        grounding=GroundingResult(
            state=state,
            findings=[ImageFinding(label=lab, laterality=side,
                                   box=Box(y0=0.1, x0=0.1, y1=0.2, x1=0.2))
                      for lab, side in findings] if state is GroundingState.OK else [],
        ),
        draft=DraftResult(state=DraftState.PARSED),
        mode=AuditMode.FULL,
        comparator_version="test",
        flags=[Flag(kind=k, label=lab, rationale="r") for k, lab in flags],
    )


PTX, EFF = Label.PNEUMOTHORAX, Label.PLEURAL_EFFUSION


def test_identical_results_have_no_change() -> None:
    a = _result([(FlagKind.MISSING, PTX)], [(PTX, Laterality.LEFT)])
    assert not diff_results(a, a).changed


def test_flags_and_findings_added_and_removed() -> None:
    a = _result([(FlagKind.MISSING, PTX)], [(PTX, Laterality.LEFT)])
    b = _result([(FlagKind.UNSUPPORTED, EFF)], [(PTX, Laterality.RIGHT)])
    d = diff_results(a, b)
    assert d.flags_added == [("unsupported", "pleural_effusion")]
    assert d.flags_removed == [("missing", "pneumothorax")]
    assert d.findings_added == [("pneumothorax", "right")]
    assert d.findings_removed == [("pneumothorax", "left")]
    assert d.changed and d.mode is None


def test_grounding_state_change_is_a_change() -> None:
    a = _result([], [(PTX, None)])
    b = _result([], [], state=GroundingState.FAILED)
    d = diff_results(a, b)
    assert d.grounding_state == ("ok", "failed") and d.findings_removed == [("pneumothorax", "-")]


def test_summary_counts_and_rows() -> None:
    summary = DiffSummary(only_a=["3"])
    same = _result([(FlagKind.MISSING, PTX)], [(PTX, None)])
    summary.add("1", same, same)
    summary.add("2", same, _result([], [(PTX, None)]))
    summary.add("4", _result([], []), _result([], [(PTX, None)]))
    body = summary.as_dict()
    assert body["compared"] == 3 and body["changed"] == 2 and body["only_in_a"] == ["3"]
    assert body["counts"]["flags_removed"] == {"missing:pneumothorax": 1}
    assert body["counts"]["findings_added"] == {"pneumothorax:-": 1}
    assert set(body["studies"]) == {"2", "4"}
    assert summary.rows() == [("flag missing:pneumothorax", "0", "1"),
                              ("finding pneumothorax:-", "1", "0")]
