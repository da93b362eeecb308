"""Draft-parser evaluation against hand-labelled reports.

A gold file is JSON Lines, one ``{"id", "text", "labels": {label: status}}`` per line; a label
left out means the report does not mention it. Figures:

- per label precision / recall / F1, where a label counts as positive when its status is
  ``present`` (gold and prediction alike), and their macro average over the six labels;
- status accuracy over every gold mention (a missing prediction is wrong);
- negation accuracy: the same, over gold mentions whose status is ``absent``;
- hedge accuracy: the same, over gold mentions whose status is ``uncertain``;
- spurious mentions: labels predicted for a report whose gold leaves them out.

``python -m cxr_auditor.eval.drafts tests/data/drafts_dev.jsonl`` prints the table; ``--errors``
lists the reports that disagree (ids and labels only, never text), ``--json`` prints the figures
as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_auditor.drafts import get_parser
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.labels import LABELS, Label
from cxr_auditor.schema import DraftStatus


@dataclass(frozen=True)
class GoldReport:
    """One hand-labelled draft."""

    id: str
    text: str
    labels: dict[Label, DraftStatus]


@dataclass
class LabelCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class _Ratio:
    right: int = 0
    total: int = 0

    @property
    def value(self) -> float:
        return self.right / self.total if self.total else 1.0


@dataclass
class DraftMetrics:
    """Figures of one parser on one gold set."""

    reports: int = 0
    per_label: dict[Label, LabelCounts] = field(
        default_factory=lambda: {lab: LabelCounts() for lab in LABELS}
    )
    status: _Ratio = field(default_factory=_Ratio)
    negation: _Ratio = field(default_factory=_Ratio)
    hedge: _Ratio = field(default_factory=_Ratio)
    spurious: int = 0
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def macro_f1(self) -> float:
        return sum(c.f1 for c in self.per_label.values()) / len(self.per_label)

    @property
    def status_accuracy(self) -> float:
        return self.status.value

    @property
    def negation_accuracy(self) -> float:
        return self.negation.value

    @property
    def hedge_accuracy(self) -> float:
        return self.hedge.value

    def as_dict(self) -> dict[str, Any]:
        return {
            "reports": self.reports,
            "macro_f1": round(self.macro_f1, 4),
            "status_accuracy": round(self.status_accuracy, 4),
            "negation_accuracy": round(self.negation_accuracy, 4),
            "negation_mentions": self.negation.total,
            "hedge_accuracy": round(self.hedge_accuracy, 4),
            "hedge_mentions": self.hedge.total,
            "spurious_mentions": self.spurious,
            "per_label": {
                lab.value: {
                    "precision": round(c.precision, 4),
                    "recall": round(c.recall, 4),
                    "f1": round(c.f1, 4),
                    "support": c.tp + c.fn,
                }
                for lab, c in self.per_label.items()
            },
        }


def load_gold(path: Path) -> list[GoldReport]:
    """Read a gold JSONL file; a malformed line raises ValueError naming its line number."""
    out: list[GoldReport] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                labels = {Label(k): DraftStatus(v) for k, v in rec.get("labels", {}).items()}
                out.append(GoldReport(id=str(rec["id"]), text=str(rec["text"]), labels=labels))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a gold record ({exc})") from exc
    return out


def evaluate(gold: Iterable[GoldReport], parser: DraftParser | None = None) -> DraftMetrics:
    """Run ``parser`` (default: rules) over ``gold`` and count."""
    parser = parser or get_parser("rules")
    reports = list(gold)
    results = parser.parse_many([g.text for g in reports])
    metrics = DraftMetrics(reports=len(reports))
    for g, result in zip(reports, results, strict=True):
        predicted = {f.label: f.status for f in result.findings}
        for lab in LABELS:
            want, got = g.labels.get(lab), predicted.get(lab)
            want_pos, got_pos = want is DraftStatus.PRESENT, got is DraftStatus.PRESENT
            counts = metrics.per_label[lab]
            counts.tp += want_pos and got_pos
            counts.fp += got_pos and not want_pos
            counts.fn += want_pos and not got_pos
            if want is None:
                if got is not None:
                    metrics.spurious += 1
                    metrics.errors.append((g.id, lab.value, "-", got.value))
                continue
            right = got is want
            metrics.status.right += right
            metrics.status.total += 1
            if want is DraftStatus.ABSENT:
                metrics.negation.right += right
                metrics.negation.total += 1
            elif want is DraftStatus.UNCERTAIN:
                metrics.hedge.right += right
                metrics.hedge.total += 1
            if not right:
                metrics.errors.append((g.id, lab.value, want.value, got.value if got else "-"))
    return metrics


def format_table(metrics: DraftMetrics) -> str:
    """A plain-text table of the figures."""
    lines = [f"{'label':<28} {'P':>6} {'R':>6} {'F1':>6} {'support':>8}"]
    for lab, c in metrics.per_label.items():
        lines.append(
            f"{lab.value:<28} {c.precision:6.3f} {c.recall:6.3f} {c.f1:6.3f} {c.tp + c.fn:8d}"
        )
    lines += [
        f"{'macro-F1':<28} {metrics.macro_f1:20.3f}",
        f"reports: {metrics.reports}",
        f"status accuracy (3-class): {metrics.status_accuracy:.3f} over {metrics.status.total}",
        f"negation accuracy: {metrics.negation_accuracy:.3f} over {metrics.negation.total}",
        f"hedge accuracy: {metrics.hedge_accuracy:.3f} over {metrics.hedge.total}",
        f"spurious mentions: {metrics.spurious}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr_auditor.eval.drafts", description=__doc__)
    ap.add_argument("gold", type=Path, nargs="+", help="gold JSONL file(s)")
    ap.add_argument("--parser", default="rules", help="parser name (default: rules)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--errors", action="store_true", help="list disagreements (id, label)")
    ap.add_argument(
        "--prefix", default="", help="only reports whose id starts with this (one batch: 'h4b1-')"
    )
    args = ap.parse_args(argv)
    try:
        gold = [g for path in args.gold for g in load_gold(path) if g.id.startswith(args.prefix)]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = evaluate(gold, get_parser(args.parser))
    print(json.dumps(metrics.as_dict(), indent=2) if args.json else format_table(metrics))
    if args.errors:
        for rid, lab, want, got in metrics.errors:
            print(f"{rid}\t{lab}\tgold={want}\tgot={got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
