"""The deterministic comparator: image findings against draft statements, per study.

Implements CONTRACT.md "Comparator". With I the positive labels present on any audited image,
A the labels the draft asserts, D those it denies and H those it hedges:

- MISSING = I − A − H, with ``denied`` when the label is in D;
- UNSUPPORTED = A − I, carrying the span of the first asserting statement;
- URGENT = I ∩ urgent, with ``missed`` when the label is also MISSING;
- HEDGED = H, for information;
- LATERALITY: a side stated on a present draft finding that no box of that label shares.

A draft that is absent or unparseable gives an image-only audit (findings and URGENT, no
MISSING/UNSUPPORTED); an inconclusive or failed grounding gives no flags at all. ``no_finding``
is never flagged. Rationales are fixed templates, flags come out in canonical label order, and
the same inputs always give the same output.
"""

from __future__ import annotations

from cxr_auditor.labels import LABELS, Label
from cxr_auditor.schema import (
    AuditMode,
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    Laterality,
)

__all__ = ["COMPARATOR_VERSION", "RATIONALES", "compare"]

COMPARATOR_VERSION = "1.0.0"

#: Every rationale a flag can carry, keyed by (kind, variant).
RATIONALES: dict[tuple[FlagKind, str], str] = {
    (FlagKind.MISSING, "omitted"): "Seen on the image but not stated in the draft.",
    (FlagKind.MISSING, "denied"): "Seen on the image but denied by the draft.",
    (FlagKind.UNSUPPORTED, "default"): "Asserted by the draft but not seen on the image.",
    (FlagKind.URGENT, "missed"): "Urgent finding seen on the image and missing from the draft.",
    (FlagKind.URGENT, "stated"): "Urgent finding seen on the image and stated in the draft.",
    (FlagKind.URGENT, "image_only"): "Urgent finding seen on the image; no draft to compare.",
    (FlagKind.HEDGED, "seen"): "Stated as uncertain by the draft; seen on the image.",
    (FlagKind.HEDGED, "not_seen"): "Stated as uncertain by the draft; not seen on the image.",
    (FlagKind.LATERALITY, "default"): (
        "The side stated in the draft differs from the side of the finding on the image."
    ),
}

_LABEL_ORDER = {label: i for i, label in enumerate(LABELS)}
_KIND_ORDER = {kind: i for i, kind in enumerate(FlagKind)}


def _flag(
    kind: FlagKind,
    variant: str,
    label: Label,
    image_indices: list[int],
    source: DraftFinding | None = None,
    **extra: bool,
) -> Flag:
    return Flag(
        kind=kind,
        label=label,
        rationale=RATIONALES[(kind, variant)],
        span=source.span if source else None,
        start=source.start if source else None,
        end=source.end if source else None,
        image_indices=image_indices,
        **extra,
    )


def _first_by_label(draft: DraftResult, status: DraftStatus) -> dict[Label, DraftFinding]:
    out: dict[Label, DraftFinding] = {}
    for finding in draft.findings:
        if finding.status is status and finding.label is not Label.NO_FINDING:
            out.setdefault(finding.label, finding)
    return out


def _side_agrees(draft_side: Laterality, image_sides: set[Laterality]) -> bool:
    """Whether a stated side fits the sides of a label's boxes: left or right needs a box on
    that side; bilateral needs boxes on both sides; a box that itself spans both sides fits
    any statement."""
    if Laterality.BILATERAL in image_sides:
        return True
    if draft_side is Laterality.BILATERAL:
        return {Laterality.LEFT, Laterality.RIGHT} <= image_sides
    return draft_side in image_sides


def _laterality_flags(
    grounding: GroundingResult, draft: DraftResult, image_labels: dict[Label, list[int]]
) -> list[Flag]:
    """One flag per label whose stated side no box of that label shares (unknown sides skip)."""
    sides: dict[Label, set[Laterality]] = {}
    indices: dict[Label, set[int]] = {}
    for finding in grounding.findings:
        if finding.laterality is not None:
            sides.setdefault(finding.label, set()).add(finding.laterality)
            indices.setdefault(finding.label, set()).add(finding.image_index)
    flags: dict[Label, Flag] = {}
    for statement in draft.findings:
        label = statement.label
        if (
            statement.status is not DraftStatus.PRESENT
            or statement.laterality is None
            or label not in image_labels
            or label not in sides
            or label in flags
        ):
            continue
        if not _side_agrees(statement.laterality, sides[label]):
            flags[label] = _flag(
                FlagKind.LATERALITY, "default", label, sorted(indices[label]), statement
            )
    return list(flags.values())


def _partially_grounded(grounding: GroundingResult) -> bool:
    """True when some audited image was not read (``pipeline.merge_grounding`` notes each such
    image as ``image<i>:grounding_failed`` / ``grounding_inconclusive``)."""
    return any(
        note.endswith((":grounding_failed", ":grounding_inconclusive")) for note in grounding.notes
    )


def compare(
    grounding: GroundingResult, draft: DraftResult, *, urgent: frozenset[Label]
) -> tuple[AuditMode, list[Flag], list[str]]:
    """Compare one study's grounding with its draft (CONTRACT.md "Comparator").

    Returns ``(mode, flags, notes)``: ``full`` when both sides are usable, ``image_only`` when
    the draft is absent or unparseable, ``no_flags`` when the grounding is not ``ok``. Notes are
    reason codes saying why a mode other than ``full`` was chosen, plus
    ``draft_present_and_absent:<label>`` where the draft contradicts itself (it then counts as
    asserted).
    """
    if grounding.state is not GroundingState.OK:
        return AuditMode.NO_FLAGS, [], [f"grounding_{grounding.state.value}:no_flags"]

    image_labels = _image_labels(grounding)
    if draft.state is not DraftState.PARSED:
        mode = AuditMode.IMAGE_ONLY
        notes = [f"draft_{draft.state.value}:image_only"]
        flags = [
            _flag(FlagKind.URGENT, "image_only", label, image_labels[label])
            for label in urgent & image_labels.keys()
        ]
    else:
        mode = AuditMode.FULL
        flags, notes = _full_flags(grounding, draft, image_labels, urgent)
    flags.sort(key=lambda f: (_LABEL_ORDER[f.label], _KIND_ORDER[f.kind]))
    return mode, flags, notes


def _image_labels(grounding: GroundingResult) -> dict[Label, list[int]]:
    """Each positive label the grounding found, with the sorted indices of its images."""
    found: dict[Label, set[int]] = {}
    for finding in grounding.findings:
        if finding.label is not Label.NO_FINDING:
            found.setdefault(finding.label, set()).add(finding.image_index)
    return {label: sorted(idx) for label, idx in found.items()}


def _full_flags(
    grounding: GroundingResult,
    draft: DraftResult,
    image_labels: dict[Label, list[int]],
    urgent: frozenset[Label],
) -> tuple[list[Flag], list[str]]:
    """MISSING, UNSUPPORTED, URGENT, HEDGED and LATERALITY flags of a parsed draft, and notes."""
    flags: list[Flag] = []
    notes: list[str] = []
    asserted = _first_by_label(draft, DraftStatus.PRESENT)
    denied = _first_by_label(draft, DraftStatus.ABSENT)
    hedged = _first_by_label(draft, DraftStatus.UNCERTAIN)
    missing = image_labels.keys() - asserted.keys() - hedged.keys()
    for label in missing:
        variant = "denied" if label in denied else "omitted"
        flags.append(
            _flag(
                FlagKind.MISSING, variant, label, image_labels[label], denied.get(label),
                denied=label in denied,
            )
        )
    if _partially_grounded(grounding):
        # A view the model could not read might show what the draft asserts: no
        # UNSUPPORTED from the views that were read alone (CONTRACT: failed -> no flags).
        notes.append("grounding_partial:unsupported_not_computed")
    else:
        for label in asserted.keys() - image_labels.keys():
            flags.append(_flag(FlagKind.UNSUPPORTED, "default", label, [], asserted[label]))
    for label in urgent & image_labels.keys():
        variant = "missed" if label in missing else "stated"
        flags.append(
            _flag(
                FlagKind.URGENT, variant, label, image_labels[label], asserted.get(label),
                missed=label in missing,
            )
        )
    for label, statement in hedged.items():
        seen = label in image_labels
        flags.append(
            _flag(
                FlagKind.HEDGED, "seen" if seen else "not_seen", label,
                image_labels.get(label, []), statement,
            )
        )
    flags.extend(_laterality_flags(grounding, draft, image_labels))
    notes.extend(
        f"draft_present_and_absent:{label.value}"
        for label in sorted(asserted.keys() & denied.keys(), key=_LABEL_ORDER.__getitem__)
    )
    return flags, notes
