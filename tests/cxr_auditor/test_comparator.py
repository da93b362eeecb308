"""Tests for cxr_auditor.comparator (CONTRACT.md "Comparator")."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxr_auditor.comparator import COMPARATOR_VERSION, RATIONALES, compare
from cxr_auditor.labels import DEFAULT_URGENT, Label
from cxr_auditor.schema import (
    AuditMode,
    AuditResult,
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    Laterality,
)

E = Label.PLEURAL_EFFUSION
P = Label.PNEUMOTHORAX
C = Label.CARDIOMEGALY
N = Label.NO_FINDING
NONE: frozenset[Label] = frozenset()


def _grounding(*findings: tuple[Label, int, Laterality | None]) -> GroundingResult:
    return GroundingResult(
        state=GroundingState.OK,
        findings=[ImageFinding(label=lab, image_index=i, laterality=side) for lab, i, side in findings],
    )


def _draft(
    *statements: tuple[Label, DraftStatus, Laterality | None], state: DraftState = DraftState.PARSED
) -> DraftResult:
    findings = []
    for n, (label, status, side) in enumerate(statements):
        span = f"{label.value} {status.value} #{n}"
        findings.append(
            DraftFinding(
                label=label, status=status, span=span, start=100 * n, end=100 * n + len(span),
                laterality=side,
            )
        )
    return DraftResult(state=state, findings=findings)


def _summary(flags: list[Flag]) -> list[tuple[str, str, bool | None, bool | None]]:
    return [(f.kind.value, f.label.value, f.denied, f.missed) for f in flags]


# image side of label E: "present" (boxed), "absent" (normal study), "silent" (other finding only)
_IMAGE = {
    "present": _grounding((E, 0, None)),
    "absent": _grounding((N, 0, None)),
    "silent": _grounding((C, 0, None)),
}
_DRAFT_STATUS = {
    "present": DraftStatus.PRESENT,
    "absent": DraftStatus.ABSENT,
    "uncertain": DraftStatus.UNCERTAIN,
}

_MATRIX = [
    ("present", "present", []),
    ("present", "absent", [("missing", "pleural_effusion", True, None)]),
    ("present", "uncertain", [("hedged", "pleural_effusion", None, None)]),
    ("present", "silent", [("missing", "pleural_effusion", False, None)]),
    ("absent", "present", [("unsupported", "pleural_effusion", None, None)]),
    ("absent", "absent", []),
    ("absent", "uncertain", [("hedged", "pleural_effusion", None, None)]),
    ("absent", "silent", []),
    ("silent", "present", [("unsupported", "pleural_effusion", None, None)]),
    ("silent", "absent", []),
    ("silent", "uncertain", [("hedged", "pleural_effusion", None, None)]),
    ("silent", "silent", []),
]


@pytest.mark.parametrize(("image", "draft", "expected"), _MATRIX)
def test_full_status_matrix(
    image: str, draft: str, expected: list[tuple[str, str, bool | None, bool | None]]
) -> None:
    statements = [] if draft == "silent" else [(E, _DRAFT_STATUS[draft], None)]
    # The "silent" image's cardiomegaly is asserted so only effusion flags remain.
    statements.append((C, DraftStatus.PRESENT, None))
    mode, flags, notes = compare(_IMAGE[image], _draft(*statements), urgent=NONE)
    assert mode is AuditMode.FULL
    unrelated = [f for f in flags if f.label is C and f.kind is not FlagKind.UNSUPPORTED]
    assert unrelated == []
    assert _summary([f for f in flags if f.label is E]) == expected
    assert notes == []


class TestNoFinding:
    def test_both_normal_gives_nothing(self) -> None:
        got = compare(_grounding((N, 0, None)), _draft((N, DraftStatus.PRESENT, None)), urgent=NONE)
        assert got == (AuditMode.FULL, [], [])

    def test_normal_image_positive_draft_is_unsupported(self) -> None:
        _, flags, _ = compare(
            _grounding((N, 0, None)), _draft((C, DraftStatus.PRESENT, None)), urgent=NONE
        )
        assert _summary(flags) == [("unsupported", "cardiomegaly", None, None)]

    def test_normal_draft_does_not_hide_image_positive(self) -> None:
        _, flags, _ = compare(
            _grounding((C, 0, None)), _draft((N, DraftStatus.PRESENT, None)), urgent=NONE
        )
        assert _summary(flags) == [("missing", "cardiomegaly", False, None)]

    def test_no_finding_never_flagged_whatever_its_status(self) -> None:
        draft = _draft((N, DraftStatus.UNCERTAIN, None), (N, DraftStatus.ABSENT, None))
        assert compare(_grounding((N, 0, None)), draft, urgent=NONE)[1] == []


class TestUrgent:
    @pytest.mark.parametrize(
        ("status", "expected"),
        [
            (None, [("missing", "pneumothorax", False, None), ("urgent", "pneumothorax", None, True)]),
            (DraftStatus.PRESENT, [("urgent", "pneumothorax", None, False)]),
            (
                DraftStatus.ABSENT,
                [("missing", "pneumothorax", True, None), ("urgent", "pneumothorax", None, True)],
            ),
            (
                DraftStatus.UNCERTAIN,
                [("urgent", "pneumothorax", None, False), ("hedged", "pneumothorax", None, None)],
            ),
        ],
    )
    def test_missed_only_when_missing(
        self, status: DraftStatus | None, expected: list[tuple[str, str, bool | None, bool | None]]
    ) -> None:
        draft = _draft() if status is None else _draft((P, status, None))
        _, flags, _ = compare(_grounding((P, 0, None)), draft, urgent=DEFAULT_URGENT)
        assert _summary(flags) == expected

    def test_urgent_set_is_configurable(self) -> None:
        _, flags, _ = compare(
            _grounding((C, 0, None)), _draft((C, DraftStatus.PRESENT, None)), urgent=frozenset({C})
        )
        assert _summary(flags) == [("urgent", "cardiomegaly", None, False)]
        assert flags[0].rationale == RATIONALES[(FlagKind.URGENT, "stated")]
        assert flags[0].span == "cardiomegaly present #0"

    def test_urgent_carries_every_image_index(self) -> None:
        grounding = _grounding((P, 1, None), (P, 0, None), (P, 1, None))
        _, flags, _ = compare(grounding, _draft(), urgent=DEFAULT_URGENT)
        assert [f.image_indices for f in flags] == [[0, 1], [0, 1]]


class TestDegradedModes:
    @pytest.mark.parametrize("state", [DraftState.NONE, DraftState.UNPARSEABLE])
    def test_image_only_reports_urgent_but_no_missing(self, state: DraftState) -> None:
        grounding = _grounding((P, 0, None), (C, 0, None))
        mode, flags, notes = compare(grounding, _draft(state=state), urgent=DEFAULT_URGENT)
        assert mode is AuditMode.IMAGE_ONLY
        assert _summary(flags) == [("urgent", "pneumothorax", None, None)]
        assert flags[0].rationale == RATIONALES[(FlagKind.URGENT, "image_only")]
        assert notes == [f"draft_{state.value}:image_only"]

    @pytest.mark.parametrize("state", [GroundingState.INCONCLUSIVE, GroundingState.FAILED])
    def test_grounding_not_ok_gives_no_flags(self, state: GroundingState) -> None:
        grounding = GroundingResult(state=state, raw_text="x")
        mode, flags, notes = compare(
            grounding, _draft((P, DraftStatus.PRESENT, None)), urgent=DEFAULT_URGENT
        )
        assert (mode, flags, notes) == (AuditMode.NO_FLAGS, [], [f"grounding_{state.value}:no_flags"])


    @pytest.mark.parametrize("other", [GroundingState.FAILED, GroundingState.INCONCLUSIVE])
    def test_a_view_not_read_stops_unsupported_but_not_missing(
        self, other: GroundingState
    ) -> None:
        """One view read, one not: what the read view shows is still MISSING from the draft,
        but nothing the draft asserts can be called UNSUPPORTED."""
        grounding = GroundingResult(
            state=GroundingState.OK,
            findings=[ImageFinding(label=P, image_index=0)],
            notes=[f"image1:grounding_{other.value}"],
        )
        mode, flags, notes = compare(
            grounding, _draft((C, DraftStatus.PRESENT, None)), urgent=DEFAULT_URGENT
        )
        assert mode is AuditMode.FULL
        assert _summary(flags) == [
            ("missing", "pneumothorax", False, None),
            ("urgent", "pneumothorax", None, True),
        ]
        assert "grounding_partial:unsupported_not_computed" in notes


class TestLaterality:
    L, R, B = Laterality.LEFT, Laterality.RIGHT, Laterality.BILATERAL

    @pytest.mark.parametrize(
        ("boxes", "stated", "flagged"),
        [
            ([L], R, True),
            ([L], L, False),
            ([L, R], R, False),
            ([L], B, True),
            ([L, R], B, False),
            ([B], L, False),
            ([None], R, False),
            ([L], None, False),
        ],
    )
    def test_side_agreement(
        self, boxes: list[Laterality | None], stated: Laterality | None, flagged: bool
    ) -> None:
        grounding = _grounding(*[(E, i, side) for i, side in enumerate(boxes)])
        _, flags, _ = compare(grounding, _draft((E, DraftStatus.PRESENT, stated)), urgent=NONE)
        lat = [f for f in flags if f.kind is FlagKind.LATERALITY]
        assert bool(lat) is flagged
        if flagged:
            assert lat[0].span == "pleural_effusion present #0"
            assert lat[0].image_indices == [i for i, s in enumerate(boxes) if s is not None]

    def test_hedged_side_not_checked(self) -> None:
        _, flags, _ = compare(
            _grounding((E, 0, Laterality.LEFT)),
            _draft((E, DraftStatus.UNCERTAIN, Laterality.RIGHT)),
            urgent=NONE,
        )
        assert [f.kind for f in flags] == [FlagKind.HEDGED]


def test_flags_sorted_canonically_and_deterministic() -> None:
    findings = [(C, 0, None), (P, 1, None), (E, 0, None)]
    statements = [
        (Label.NODULE_MASS, DraftStatus.PRESENT, None),
        (E, DraftStatus.ABSENT, None),
        (Label.LUNG_OPACITY_CONSOLIDATION, DraftStatus.UNCERTAIN, None),
    ]
    expected = [
        ("missing", "pleural_effusion", True, None),
        ("missing", "pneumothorax", False, None),
        ("urgent", "pneumothorax", None, True),
        ("hedged", "lung_opacity_consolidation", None, None),
        ("unsupported", "nodule_mass", None, None),
        ("missing", "cardiomegaly", False, None),
    ]
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(findings)
        _, flags, _ = compare(_grounding(*findings), _draft(*statements), urgent=DEFAULT_URGENT)
        assert _summary(flags) == expected


def test_contradictory_draft_counts_as_asserted_and_is_noted() -> None:
    draft = _draft((P, DraftStatus.PRESENT, None), (P, DraftStatus.ABSENT, None))
    _, flags, notes = compare(_grounding((C, 0, None)), draft, urgent=NONE)
    assert ("unsupported", "pneumothorax", None, None) in _summary(flags)
    assert notes == ["draft_present_and_absent:pneumothorax"]


def test_every_rationale_is_a_fixed_template() -> None:
    grounding = _grounding((P, 0, None), (E, 0, Laterality.LEFT))
    draft = _draft(
        (E, DraftStatus.PRESENT, Laterality.RIGHT),
        (C, DraftStatus.PRESENT, None),
        (Label.NODULE_MASS, DraftStatus.UNCERTAIN, None),
    )
    _, flags, _ = compare(grounding, draft, urgent=DEFAULT_URGENT)
    assert {f.kind for f in flags} == set(FlagKind)
    assert all(f.rationale in RATIONALES.values() for f in flags)


def test_output_is_a_valid_audit_result() -> None:
    grounding = _grounding((P, 0, None))
    draft = _draft((C, DraftStatus.PRESENT, None))
    mode, flags, notes = compare(grounding, draft, urgent=DEFAULT_URGENT)
    result = AuditResult(
        grounding=grounding,
        draft=draft,
        mode=mode,
        comparator_version=COMPARATOR_VERSION,
        flags=flags,
        notes=notes,
    )
    assert [f.kind for f in result.flags] == [FlagKind.MISSING, FlagKind.URGENT, FlagKind.UNSUPPORTED]


_POS = [lab for lab in Label if lab is not N]


@settings(max_examples=200, deadline=None)
@given(
    image=st.lists(st.sampled_from(list(Label)), max_size=6),
    draft=st.lists(st.tuples(st.sampled_from(list(Label)), st.sampled_from(list(DraftStatus))), max_size=8),
    urgent=st.frozensets(st.sampled_from(_POS)),
)
def test_flags_follow_the_set_formulas(
    image: list[Label], draft: list[tuple[Label, DraftStatus]], urgent: frozenset[Label]
) -> None:
    grounding = _grounding(*[(lab, 0, None) for lab in image])
    mode, flags, _ = compare(grounding, _draft(*[(lab, st_, None) for lab, st_ in draft]), urgent=urgent)
    i = set(image) - {N}
    a = {lab for lab, s in draft if s is DraftStatus.PRESENT} - {N}
    d = {lab for lab, s in draft if s is DraftStatus.ABSENT} - {N}
    h = {lab for lab, s in draft if s is DraftStatus.UNCERTAIN} - {N}
    by_kind = {kind: {f.label for f in flags if f.kind is kind} for kind in FlagKind}
    assert mode is AuditMode.FULL
    assert by_kind[FlagKind.MISSING] == i - a - h
    assert by_kind[FlagKind.UNSUPPORTED] == a - i
    assert by_kind[FlagKind.URGENT] == i & urgent
    assert by_kind[FlagKind.HEDGED] == h
    assert by_kind[FlagKind.LATERALITY] == set()
    for f in flags:
        if f.kind is FlagKind.MISSING:
            assert f.denied is (f.label in d)
        if f.kind is FlagKind.URGENT:
            assert f.missed is (f.label in i - a - h)
