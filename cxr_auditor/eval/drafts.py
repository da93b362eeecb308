"""Draft-parser evaluation: several parsers over several labelled report sets, side by side.

Gold files are JSON Lines, one report per line, in either of two forms:

- hand-labelled (the in-house sets under ``tests/data``): ``{"id", "text", "labels": {label:
  status}}``; every status counts, ``uncertain`` included;
- silver (``score_drafts.py``'s format, as for the real development set): ``{"id", "text",
  "labels": [{"label", "status"}, ...]}`` with only ``present`` and ``uncertain``; an
  ``uncertain`` cell is don't-care for presence, and ``"labels": null`` marks an unscorable report.

In both, a label left out means the report does not mention it (or denies it). Figures per parser
and set:

- per label precision / recall / F1, a label counting as positive when its status is ``present``;
  ``macro_f1`` averages the six labels, ``macro_f1_supported`` the labels with a gold positive;
- status accuracy over every gold mention; negation accuracy over gold ``absent`` mentions; hedge
  accuracy over gold ``uncertain`` mentions (hand-labelled sets only);
- **negated-list false positives**: labels returned ``present`` although every mention of them in
  the report sits inside a negated list ("no consolidation, pneumothorax or large effusion"),
  found by :func:`negated_list_labels`, a detector independent of the parsers' scope logic;
- reports per second of the parse itself, on one core.

``python -m cxr_auditor.eval.drafts`` runs the rules parser and the NegEx baseline over the
in-house sets; name gold files (the real set included) and ``--parser`` (repeatable: ``rules``,
``negex``, or any ``task: draft_parsing`` profile) to choose. ``--detail`` adds per-label tables,
``--errors`` the disagreeing ids and labels (never text), ``--json`` everything as JSON.

``--adjudicate FILE`` applies reviewed corrections to silver labels: JSON Lines of ``{"id",
"label", "status"}`` (``uncertain`` makes the cell don't-care) for the cells where the report's
text clearly disagrees with its label. Both parsers are scored against the same corrected gold.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cxr_auditor.drafts import _lexicon as lx
from cxr_auditor.drafts import get_parser
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.drafts.negex import NegExDraftParser
from cxr_auditor.errors import CxrAuditError
from cxr_auditor.eval.stats import BinaryCounts
from cxr_auditor.labels import LABELS, Label
from cxr_auditor.schema import DraftStatus

#: The in-house hand-labelled sets, used when no gold file is named (a source checkout).
IN_HOUSE = Path(__file__).resolve().parents[2] / "tests" / "data"
DEFAULT_PARSERS = ("rules", "negex")

_R = TypeVar("_R")


@dataclass(frozen=True)
class GoldReport:
    """One hand-labelled draft."""

    id: str
    text: str
    labels: dict[Label, DraftStatus]
    #: labels whose gold is don't-care for presence (silver ``uncertain`` cells)
    dont_care: frozenset[Label] = frozenset()


def _scored(value: float | None) -> float:
    """A figure with nothing to score (no gold and no predicted positive) counts as perfect, so
    a label a set never mentions does not pull the six-label macro average down."""
    return 1.0 if value is None else value


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
    per_label: dict[Label, BinaryCounts] = field(
        default_factory=lambda: {lab: BinaryCounts() for lab in LABELS}
    )
    status: _Ratio = field(default_factory=_Ratio)
    negation: _Ratio = field(default_factory=_Ratio)
    hedge: _Ratio = field(default_factory=_Ratio)
    spurious: int = 0
    negated_list_fp: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def macro_f1(self) -> float:
        return sum(_scored(c.f1) for c in self.per_label.values()) / len(self.per_label)

    @property
    def macro_f1_supported(self) -> float:
        """Mean F1 over the labels with at least one gold positive."""
        scored = [_scored(c.f1) for c in self.per_label.values() if c.tp + c.fn]
        return sum(scored) / len(scored) if scored else 1.0

    @property
    def reports_per_second(self) -> float:
        return self.reports / self.seconds if self.seconds else 0.0

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
            "macro_f1_supported": round(self.macro_f1_supported, 4),
            "negated_list_false_positives": self.negated_list_fp,
            "reports_per_second": round(self.reports_per_second, 1),
            "status_accuracy": round(self.status_accuracy, 4),
            "negation_accuracy": round(self.negation_accuracy, 4),
            "negation_mentions": self.negation.total,
            "hedge_accuracy": round(self.hedge_accuracy, 4),
            "hedge_mentions": self.hedge.total,
            "spurious_mentions": self.spurious,
            "per_label": {
                lab.value: {
                    "precision": round(_scored(c.precision.value), 4),
                    "recall": round(_scored(c.recall.value), 4),
                    "f1": round(_scored(c.f1), 4),
                    "support": c.tp + c.fn,
                }
                for lab, c in self.per_label.items()
            },
        }


def _records(path: Path, what: str, read: Callable[[dict[str, Any]], _R]) -> list[_R]:
    """``read`` applied to each JSON line of ``path``; a malformed line raises ValueError naming
    its line number and ``what`` it should have been."""
    out: list[_R] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(read(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: not {what} ({exc})") from exc
    return out


def load_gold(path: Path) -> list[GoldReport]:
    """Read a gold JSONL file (either form); a malformed line raises ValueError naming its line."""
    return [g for g in _records(path, "a gold record", _gold_record) if g is not None]


def adjudicate(gold: list[GoldReport], path: Path) -> tuple[list[GoldReport], int]:
    """Apply reviewed cell corrections (see the module docstring); returns the corrected gold
    and the number of cells changed. An id that is not in ``gold`` is ignored (another set's)."""
    fixes: dict[str, dict[Label, DraftStatus]] = {}
    cells = _records(
        path, "an adjudication",
        lambda rec: (str(rec["id"]), Label(rec["label"]), DraftStatus(rec["status"])),
    )
    for rid, label, status in cells:
        fixes.setdefault(rid, {})[label] = status
    out, changed = [], 0
    for g in gold:
        fixed = fixes.get(g.id)
        if not fixed:
            out.append(g)
            continue
        labels, dont_care = dict(g.labels), set(g.dont_care)
        for lab, status in fixed.items():
            changed += 1
            labels.pop(lab, None)
            dont_care.discard(lab)
            if status is DraftStatus.UNCERTAIN:
                dont_care.add(lab)
            else:
                labels[lab] = status
        out.append(GoldReport(g.id, g.text, labels, frozenset(dont_care)))
    return out, changed


def _gold_record(rec: dict[str, Any]) -> GoldReport | None:
    raw = rec.get("labels", {})
    if raw is None:
        return None  # silver: unscorable (no indexing)
    if isinstance(raw, list):
        cells = {Label(item["label"]): DraftStatus(item["status"]) for item in raw}
        dont_care = frozenset(lab for lab, st in cells.items() if st is DraftStatus.UNCERTAIN)
        labels = {lab: st for lab, st in cells.items() if lab not in dont_care}
        return GoldReport(str(rec["id"]), str(rec["text"]), labels, dont_care)
    labels = {Label(k): DraftStatus(v) for k, v in raw.items()}
    return GoldReport(id=str(rec["id"]), text=str(rec["text"]), labels=labels)


# Words that end a negated list: a terminator or a verb.
_LIST_END = (
    r"but|however|although|though|except|which|whereas|is|are|was|were|there|has|have|seen"
    r"|noted|present|identified"
)
# A negation cue, then a clause that joins alternatives with "or" / "nor" before any clause
# end, terminator or verb: "no consolidation, pneumothorax or sizeable effusion". After the "or"
# the last member also ends at a comma, "and" or "with" (a new statement follows).
_NEG_LIST = re.compile(
    r"\b(?:no|without|negative for|free of|absence of)\b"
    rf"(?P<list>(?:(?!\b(?:{_LIST_END})\b)[^.;:!?\n])*?\b(?:or|nor)\b"
    rf"(?:(?!\b(?:{_LIST_END}|and|with)\b)[^.;:!?\n,])*)"
)


def negated_list_labels(text: str) -> set[Label]:
    """Labels named in ``text`` only inside negated lists of alternatives.

    A simple detector of its own (a negation word, then an "or"/"nor" list up to the clause's
    end, a terminator or a verb), so the count does not inherit a parser's scope logic.
    """
    low = text.lower()
    spans = [m.span("list") for m in _NEG_LIST.finditer(low)]
    inside: set[Label] = set()
    outside: set[Label] = set()
    for i, start, end in lx.TERM_ALT.finditer(low, 0, len(low)):
        labels = {t for t in lx.TERMS[i].targets if isinstance(t, Label)}
        within = any(s <= start and end <= e for s, e in spans)
        (inside if within else outside).update(labels)
    return inside - outside


def evaluate(gold: Iterable[GoldReport], parser: DraftParser | None = None) -> DraftMetrics:
    """Run ``parser`` (default: rules) over ``gold`` and count."""
    parser = parser or get_parser("rules")
    reports = list(gold)
    started = time.process_time()
    results = parser.parse_many([g.text for g in reports])
    metrics = DraftMetrics(reports=len(reports), seconds=time.process_time() - started)
    for g, result in zip(reports, results, strict=True):
        predicted = {f.label: f.status for f in result.findings}
        listed = negated_list_labels(g.text)
        for lab in LABELS:
            want, got = g.labels.get(lab), predicted.get(lab)
            want_pos, got_pos = want is DraftStatus.PRESENT, got is DraftStatus.PRESENT
            if got_pos and lab in listed and not want_pos:
                metrics.negated_list_fp += 1
                metrics.errors.append((g.id, lab.value, "negated-list", "present"))
            if lab in g.dont_care:
                continue
            metrics.per_label[lab].add(want_pos, got_pos)
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
    """A plain-text table of one parser's figures on one set."""
    lines = [f"{'label':<28} {'P':>6} {'R':>6} {'F1':>6} {'support':>8}"]
    for lab, c in metrics.per_label.items():
        lines.append(
            f"{lab.value:<28} {_scored(c.precision.value):6.3f} {_scored(c.recall.value):6.3f} "
            f"{_scored(c.f1):6.3f} {c.tp + c.fn:8d}"
        )
    lines += [
        f"{'macro-F1':<28} {metrics.macro_f1:20.3f}",
        f"{'macro-F1 (labels with support)':<30} {metrics.macro_f1_supported:18.3f}",
        f"reports: {metrics.reports}",
        f"status accuracy (3-class): {metrics.status_accuracy:.3f} over {metrics.status.total}",
        f"negation accuracy: {metrics.negation_accuracy:.3f} over {metrics.negation.total}",
        f"hedge accuracy: {metrics.hedge_accuracy:.3f} over {metrics.hedge.total}",
        f"negated-list false positives: {metrics.negated_list_fp}",
        f"spurious mentions: {metrics.spurious}",
    ]
    return "\n".join(lines)


_SHORT = {
    Label.PLEURAL_EFFUSION: "eff",
    Label.PNEUMOTHORAX: "ptx",
    Label.LUNG_OPACITY_CONSOLIDATION: "opac",
    Label.NODULE_MASS: "nod",
    Label.CARDIOMEGALY: "cardio",
    Label.NO_FINDING: "normal",
}


def format_side_by_side(runs: Sequence[tuple[str, str, DraftMetrics]]) -> str:
    """One Markdown table: a row per (set, parser), F1 per label (``-`` without support)."""
    head = ["set", "parser", "reports", "macro-F1*", *(_SHORT[lab] for lab in LABELS),
            "neg acc", "hedge acc", "neg-list FP", "reports/s"]
    rows = [head, ["---"] * len(head)]
    for set_name, parser_name, m in runs:
        f1s = [
            f"{_scored(c.f1):.3f}" if c.tp + c.fn else ("-" if not c.fp else f"fp {c.fp}")
            for c in m.per_label.values()
        ]
        rows.append([
            set_name, parser_name, str(m.reports), f"{m.macro_f1_supported:.3f}", *f1s,
            f"{m.negation_accuracy:.3f} ({m.negation.total})" if m.negation.total else "-",
            f"{m.hedge_accuracy:.3f} ({m.hedge.total})" if m.hedge.total else "-",
            str(m.negated_list_fp), f"{m.reports_per_second:,.0f}",
        ])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append(
        "macro-F1* averages the labels with gold positives in that set; a label without support "
        "shows '-', or 'fp N' when a parser still called it present N times."
    )
    return "\n".join(lines)


def build_parser(name: str) -> DraftParser:
    """``negex`` (the baseline), ``rules``, or a ``task: draft_parsing`` profile by name."""
    if name == NegExDraftParser.name:
        return NegExDraftParser()
    return get_parser(name)


def _named(arg: str) -> tuple[str, Path]:
    """``NAME=PATH`` or a bare path (named by its file stem)."""
    name, sep, path = arg.partition("=")
    return (name, Path(path)) if sep and name else (Path(arg).stem, Path(arg))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr_auditor.eval.drafts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gold", nargs="*", metavar="[NAME=]GOLD",
                    help="gold JSONL file(s), each optionally named (iu-dev=PATH); "
                    "default: the in-house sets in tests/data")
    ap.add_argument("--parser", action="append", dest="parsers", metavar="NAME",
                    help="parser to run, repeatable (default: rules and negex)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--detail", action="store_true", help="add a per-label table per run")
    ap.add_argument("--errors", action="store_true", help="list disagreements (id, label)")
    ap.add_argument("--adjudicate", type=Path, metavar="FILE",
                    help="reviewed corrections of silver cells (JSONL of id, label, status)")
    ap.add_argument(
        "--prefix", default="", help="only reports whose id starts with this (one batch: 'h4b1-')"
    )
    args = ap.parse_args(argv)
    named = [_named(a) for a in args.gold] or [
        (p.stem, p) for p in sorted(IN_HOUSE.glob("drafts_*.jsonl"))
    ]
    if not named:
        print("error: no gold file named and no in-house sets found", file=sys.stderr)
        return 2
    try:
        sets = [
            (name, [g for g in load_gold(p) if g.id.startswith(args.prefix)])
            for name, p in named
        ]
        if args.adjudicate:
            corrected = [(name, adjudicate(gold, args.adjudicate)) for name, gold in sets]
            for name, (_, changed) in corrected:
                print(f"{name}: {changed} cells adjudicated", file=sys.stderr)
            sets = [(name, gold) for name, (gold, _) in corrected]
        parsers = [build_parser(n) for n in args.parsers or DEFAULT_PARSERS]
    except (OSError, ValueError, KeyError, CxrAuditError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = [(name, p.name, evaluate(gold, p)) for name, gold in sets for p in parsers]
    if args.json:
        print(json.dumps(
            [{"set": s, "parser": p, **m.as_dict()} for s, p, m in runs], indent=2
        ))
    else:
        print(format_side_by_side(runs))
        for set_name, parser_name, m in runs if args.detail else ():
            print(f"\n## {set_name}: {parser_name}\n{format_table(m)}")
    for set_name, parser_name, m in runs if args.errors else ():
        for rid, lab, want, got in m.errors:
            print(f"{set_name}\t{parser_name}\t{rid}\t{lab}\tgold={want}\tgot={got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
