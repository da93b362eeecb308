"""Evaluation of audits against labelled images: presence, localisation and audit flags.

A truth file is JSON Lines, one labelled image (a case) per line::

    {"image": "case01.png", "labels": ["pneumothorax"],
     "boxes": [{"label": "pneumothorax", "box_2d": [0.1, 0.6, 0.5, 0.9]}],
     "draft": "No pneumothorax.", "flags": [{"kind": "missing", "label": "pneumothorax"}]}

- ``labels``: the positive labels present (empty, or ``["no_finding"]``, for a normal image);
- ``boxes`` (optional): truth boxes, normalised ``[y0, x0, y1, x1]`` on the **source** image
  (not the letterboxed model input); a case with the key is part of the localisation figures;
- ``draft`` (optional): draft text audited with the image;
- ``flags`` (optional): the comparator flags a labelled draft case should raise; a case with the
  key (an empty list too) is part of the audit-flag figures.

Figures (:func:`evaluate`):

- **presence**: per label, an image counts as predicted positive when the grounder reported the
  label on it; precision, recall, specificity and F1 per label, and the macro average over the
  five positive labels (``no_finding`` is reported but kept out of the macro). Cases whose
  grounding was not ``ok`` (failed, inconclusive) are counted apart, not as negatives.
- **urgent recall**: truth (image, urgent label) pairs the grounder found.
- **localisation**: predicted boxes are matched to truth boxes of the same label **within each
  image** (greedy, highest IoU first, one to one). Pooling boxes across images before matching,
  as the public reference did, can pair a prediction on one image with the truth on another.
  Hits at IoU >= 0.3 and >= 0.5 give precision (over predicted boxes) and recall (over truth
  boxes); ``mean_iou`` averages, over truth boxes, the IoU of the matched prediction (0 when
  none), ``mean_iou_matched`` over matched pairs only.
- **audit flags**: per flag kind, expected (kind, label) pairs against raised ones, and the share
  of cases whose flags match exactly.

Every rate carries a 95 % Wilson interval (:mod:`cxr_auditor.eval.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.eval.stats import BinaryCounts, Rate
from cxr_auditor.labels import DEFAULT_URGENT, LABELS, POSITIVE_LABELS, Label
from cxr_auditor.schema import AuditResult, Box, FlagKind, GroundingState

__all__ = [
    "IOU_THRESHOLDS",
    "EvalReport",
    "ExpectedFlag",
    "LocalisationCounts",
    "TextTable",
    "TruthBox",
    "TruthCase",
    "TruthError",
    "evaluate",
    "iou",
    "load_truth",
    "match_boxes",
    "predicted_boxes",
]

IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5)

#: A readable table: title, column names, rows of cells.
TextTable = tuple[str, tuple[str, ...], list[tuple[str, ...]]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class TruthBox(_Model):
    label: Label
    box_2d: tuple[float, float, float, float]

    @model_validator(mode="after")
    def _valid_box(self) -> TruthBox:
        self.box()  # raises ValueError for a box outside [0, 1] or without area
        return self

    def box(self) -> Box:
        y0, x0, y1, x1 = self.box_2d
        return Box(y0=y0, x0=x0, y1=y1, x1=x1)


class ExpectedFlag(_Model):
    kind: FlagKind
    label: Label


class TruthCase(_Model):
    """One labelled image (see the module docstring for the format)."""

    image: str = Field(min_length=1)
    labels: list[Label] = Field(default_factory=list)
    boxes: list[TruthBox] | None = None
    draft: str | None = None
    flags: list[ExpectedFlag] | None = None

    def positives(self) -> set[Label]:
        return {lab for lab in self.labels if lab is not Label.NO_FINDING}


class TruthError(CxrAuditError):
    """A truth file that cannot be read or has an invalid line."""


def load_truth(path: Path) -> list[TruthCase]:
    """Read a truth JSONL file; blank lines are skipped.

    Raises:
        TruthError: unreadable file, a line that is not JSON or does not validate (the message
            names the line and field, never the value), or an image listed twice.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TruthError(f"cannot read truth file {path}: {exc}") from exc
    cases: list[TruthCase] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            cases.append(TruthCase.model_validate(json.loads(line)))
        except json.JSONDecodeError:
            raise TruthError(f"{path.name} line {number}: not JSON") from None
        except (ValidationError, ValueError) as exc:
            where = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}"
                for e in exc.errors()
            ) if isinstance(exc, ValidationError) else str(exc)
            raise TruthError(f"{path.name} line {number}: {where}") from None
    seen: set[str] = set()
    for case in cases:
        if case.image in seen:
            raise TruthError(f"{path.name}: image {case.image!r} is listed twice")
        seen.add(case.image)
    return cases


# -- boxes ---------------------------------------------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two normalised boxes (0 when they do not overlap)."""
    ih = min(a.y1, b.y1) - max(a.y0, b.y0)
    iw = min(a.x1, b.x1) - max(a.x0, b.x0)
    if ih <= 0 or iw <= 0:
        return 0.0
    inter = ih * iw
    union = (a.y1 - a.y0) * (a.x1 - a.x0) + (b.y1 - b.y0) * (b.x1 - b.x0) - inter
    return inter / union


def match_boxes(truth: Sequence[Box], predicted: Sequence[Box]) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(truth index, predicted index, IoU)`` of overlapping boxes, highest
    IoU first (greedy). Call it per image and label: it knows nothing of either."""
    pairs = sorted(
        (
            (iou(t, p), ti, pi)
            for ti, t in enumerate(truth)
            for pi, p in enumerate(predicted)
        ),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    used_t: set[int] = set()
    used_p: set[int] = set()
    out: list[tuple[int, int, float]] = []
    for value, ti, pi in pairs:
        if value <= 0 or ti in used_t or pi in used_p:
            continue
        used_t.add(ti)
        used_p.add(pi)
        out.append((ti, pi, value))
    return out


def predicted_boxes(result: AuditResult, image_index: int = 0) -> list[tuple[Label, Box]]:
    """The result's boxes on one image, normalised on the **source** image (from each
    finding's pixel box and the image's size), so they compare with truth boxes whatever
    letterboxing the model input had. Findings without a pixel box are left out."""
    refs = {ref.index: ref for ref in result.inputs.images}
    ref = refs.get(image_index)
    if ref is None:
        return []
    out: list[tuple[Label, Box]] = []
    for finding in result.grounding.findings:
        pb = finding.pixel_box
        if finding.image_index != image_index or pb is None:
            continue
        out.append(
            (
                finding.label,
                Box(
                    y0=pb.y0 / ref.height,
                    x0=pb.x0 / ref.width,
                    y1=min(pb.y1 / ref.height, 1.0),
                    x1=min(pb.x1 / ref.width, 1.0),
                ),
            )
        )
    return out


@dataclass
class LocalisationCounts:
    """Box matches pooled over images *after* matching within each image."""

    truth_boxes: int = 0
    predicted_boxes: int = 0
    matched_ious: list[float] = field(default_factory=list)

    def hits(self, threshold: float) -> int:
        return sum(1 for v in self.matched_ious if v >= threshold)

    def add_image(self, truth: Sequence[tuple[Label, Box]], pred: Sequence[tuple[Label, Box]]) -> None:
        self.truth_boxes += len(truth)
        self.predicted_boxes += len(pred)
        for label in {lab for lab, _ in truth} | {lab for lab, _ in pred}:
            t = [b for lab, b in truth if lab is label]
            p = [b for lab, b in pred if lab is label]
            self.matched_ious.extend(v for _, _, v in match_boxes(t, p))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "truth_boxes": self.truth_boxes,
            "predicted_boxes": self.predicted_boxes,
            "matched": len(self.matched_ious),
            "mean_iou": round(sum(self.matched_ious) / self.truth_boxes, 4)
            if self.truth_boxes
            else None,
            "mean_iou_matched": round(sum(self.matched_ious) / len(self.matched_ious), 4)
            if self.matched_ious
            else None,
        }
        for t in IOU_THRESHOLDS:
            hits = self.hits(t)
            out[f"iou{t:g}"] = {
                "hits": hits,
                "precision": Rate(hits, self.predicted_boxes).as_dict(),
                "recall": Rate(hits, self.truth_boxes).as_dict(),
            }
        return out


# -- the report ----------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """Every figure of one evaluation run (:meth:`as_dict` is the JSON, :meth:`tables` the
    readable form)."""

    cases: int = 0
    not_scored: int = 0  # grounding not ok
    presence: dict[Label, BinaryCounts] = field(
        default_factory=lambda: {lab: BinaryCounts() for lab in LABELS}
    )
    urgent: BinaryCounts = field(default_factory=BinaryCounts)
    localisation: LocalisationCounts = field(default_factory=LocalisationCounts)
    localised_cases: int = 0
    flags: dict[FlagKind, BinaryCounts] = field(
        default_factory=lambda: {kind: BinaryCounts() for kind in FlagKind}
    )
    flag_cases: int = 0
    flag_cases_exact: int = 0

    def macro(self) -> dict[str, float | None]:
        """Mean precision, recall and F1 over the positive labels on which each is defined."""
        out: dict[str, float | None] = {}
        for name in ("precision", "recall", "f1"):
            values: list[float] = []
            for lab in POSITIVE_LABELS:
                counts = self.presence[lab]
                v = counts.f1 if name == "f1" else getattr(counts, name).value
                if v is not None:
                    values.append(v)
            out[name] = round(sum(values) / len(values), 4) if values else None
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "not_scored_grounding_not_ok": self.not_scored,
            "presence": {lab.value: c.as_dict() for lab, c in self.presence.items()},
            "presence_macro_positive_labels": self.macro(),
            "urgent_recall": self.urgent.recall.as_dict(),
            "localisation": {"cases": self.localised_cases, **self.localisation.as_dict()},
            "audit_flags": {
                "cases": self.flag_cases,
                "exact_match": Rate(self.flag_cases_exact, self.flag_cases).as_dict(),
                "by_kind": {k.value: c.as_dict() for k, c in self.flags.items()},
            },
        }

    def tables(self) -> list[TextTable]:
        """``(title, columns, rows)`` of the readable report; intervals shown where n < 100."""
        cols = ("label", "TP", "FP", "FN", "precision", "recall", "F1")
        rows: list[tuple[str, ...]] = []
        for lab, c in self.presence.items():
            f1 = "-" if c.f1 is None else f"{c.f1:.3f}"
            rows.append((lab.value, str(c.tp), str(c.fp), str(c.fn), c.precision.text(),
                         c.recall.text(), f1))
        macro = self.macro()
        rows.append(("macro (positive labels)", "", "", "",
                     *(("-" if macro[k] is None else f"{macro[k]:.3f}") for k in
                       ("precision", "recall", "f1"))))
        rows.append(("urgent recall", "", "", "", "", self.urgent.recall.text(), ""))
        tables: list[TextTable] = [(f"Presence ({self.cases} cases, {self.not_scored} not scored)", cols, rows)]
        loc = self.localisation
        loc_rows: list[tuple[str, ...]] = [
            (f"IoU >= {t:g}", str(loc.hits(t)), Rate(loc.hits(t), loc.predicted_boxes).text(),
             Rate(loc.hits(t), loc.truth_boxes).text())
            for t in IOU_THRESHOLDS
        ]
        d = loc.as_dict()
        loc_rows.append(("mean IoU (per truth box)", "", "", "-" if d["mean_iou"] is None
                         else f"{d['mean_iou']:.3f}"))
        tables.append((
            f"Localisation ({self.localised_cases} cases, {loc.truth_boxes} truth boxes, "
            f"{loc.predicted_boxes} predicted, matched within each image)",
            ("threshold", "hits", "precision", "recall"),
            loc_rows,
        ))
        flag_rows: list[tuple[str, ...]] = [
            (kind.value, str(c.tp), str(c.fp), str(c.fn), c.precision.text(), c.recall.text())
            for kind, c in self.flags.items()
        ]
        flag_rows.append(("cases exactly right", "", "", "", "",
                          Rate(self.flag_cases_exact, self.flag_cases).text()))
        tables.append((f"Audit flags ({self.flag_cases} labelled draft cases)",
                       ("flag", "TP", "FP", "FN", "precision", "recall"), flag_rows))
        return tables


def _present(result: AuditResult) -> set[Label]:
    labels = {f.label for f in result.grounding.findings}
    positives = labels - {Label.NO_FINDING}
    # A grounder that answers nothing at all on an ok image also calls it normal.
    return positives if positives else {Label.NO_FINDING}


def evaluate(
    pairs: Iterable[tuple[TruthCase, AuditResult]],
    urgent: Iterable[Label] = DEFAULT_URGENT,
) -> EvalReport:
    """Score audits against their truth cases (one image per case, ``image_index`` 0)."""
    urgent_set = frozenset(urgent)
    report = EvalReport()
    for case, result in pairs:
        report.cases += 1
        if case.flags is not None:
            report.flag_cases += 1
            expected = {(f.kind, f.label) for f in case.flags}
            raised = {(f.kind, f.label) for f in result.flags}
            report.flag_cases_exact += expected == raised
            for kind in FlagKind:
                for label in POSITIVE_LABELS:
                    report.flags[kind].add((kind, label) in expected, (kind, label) in raised)
        if result.grounding.state is not GroundingState.OK:
            report.not_scored += 1
            continue
        predicted = _present(result)
        truth = case.positives() or {Label.NO_FINDING}
        for label in LABELS:
            report.presence[label].add(label in truth, label in predicted)
        for label in urgent_set & truth:
            report.urgent.add(True, label in predicted)
        if case.boxes is not None:
            report.localised_cases += 1
            report.localisation.add_image(
                [(b.label, b.box()) for b in case.boxes], predicted_boxes(result, 0)
            )
    return report
