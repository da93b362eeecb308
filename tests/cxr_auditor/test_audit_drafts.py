"""The audit follows the reading of the draft: whole drafts through the rules parser and the
comparator, with the image findings given.

The drafts are written for these tests in the styles seen in real reports (structured normal
templates, negated lists with modifiers, hedges late in a long report); none is copied from a
report set.
"""

from __future__ import annotations

from cxr_auditor.comparator import compare
from cxr_auditor.drafts.rules import parse_draft
from cxr_auditor.labels import DEFAULT_URGENT, Label
from cxr_auditor.schema import (
    AuditMode,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
)

P = Label.PNEUMOTHORAX
N = Label.NODULE_MASS
E = Label.PLEURAL_EFFUSION
O = Label.LUNG_OPACITY_CONSOLIDATION  # noqa: E741 - the label's usual one-letter name

TEMPLATE_NORMAL = (
    "FINDINGS: The cardiomediastinal silhouette is of normal size. No focal airspace "
    "consolidation, pneumothorax or large pleural effusion. Osseous structures are intact.\n"
    "IMPRESSION: No acute cardiopulmonary process."
)


def audit(text: str, *image: Label) -> list[Flag]:
    grounding = GroundingResult(
        state=GroundingState.OK,
        findings=[ImageFinding(label=lab, image_index=0) for lab in image]
        or [ImageFinding(label=Label.NO_FINDING, image_index=0)],
    )
    mode, flags, _ = compare(grounding, parse_draft(text), urgent=DEFAULT_URGENT)
    assert mode is AuditMode.FULL
    return flags


def kinds(flags: list[Flag]) -> set[tuple[FlagKind, Label, bool | None]]:
    return {(f.kind, f.label, f.denied if f.kind is FlagKind.MISSING else f.missed) for f in flags}


def test_a_pneumothorax_denied_in_a_list_is_a_missed_urgent_finding() -> None:
    flags = kinds(audit(TEMPLATE_NORMAL, P))
    assert (FlagKind.MISSING, P, True) in flags
    assert (FlagKind.URGENT, P, True) in flags


def test_a_nodule_denied_with_modifiers_is_a_missed_urgent_finding() -> None:
    text = (
        "Heart size normal. Lungs are clear without suspicious nodules, masses, or focal "
        "airspace disease. No displaced rib fracture."
    )
    flags = kinds(audit(text, N))
    assert (FlagKind.MISSING, N, True) in flags and (FlagKind.URGENT, N, True) in flags


def test_a_finding_denied_in_a_list_is_never_a_draft_claim() -> None:
    for text in (
        TEMPLATE_NORMAL,
        "No pneumothorax, large effusion, or focal consolidation is seen.",
        "Hyperexpanded lungs without focal consolidation, pneumothorax or pleural effusion.",
    ):
        assert not [f for f in audit(text) if f.kind is FlagKind.UNSUPPORTED], text


def test_an_asserted_finding_after_a_list_is_a_claim() -> None:
    text = "No pneumothorax, small left pleural effusion. Heart size is normal."
    flags = kinds(audit(text))
    assert (FlagKind.UNSUPPORTED, E, None) in flags
    assert not any(label is P for _, label, _ in flags)


def test_a_hedged_finding_stays_hedged_in_a_long_report() -> None:
    text = (
        "FINDINGS: Lines and tubes are unchanged. Heart size is normal. No focal consolidation, "
        "pneumothorax or large pleural effusion. Degenerative change of the thoracic spine. "
        "There is a faint pleural line at the right apex, which could represent a small "
        "pneumothorax.\nIMPRESSION: No acute cardiopulmonary process."
    )
    flags = audit(text, P)
    found = kinds(flags)
    assert (FlagKind.HEDGED, P, None) in found
    assert not [f for f in flags if f.kind is FlagKind.MISSING]
    urgent = [f for f in flags if f.kind is FlagKind.URGENT]
    assert urgent and urgent[0].missed is False
