"""What changed between two audits of the same studies (two profiles, prompts or versions).

:func:`diff_results` compares two :class:`~cxr_auditor.schema.AuditResult` of one study: flags
are compared as (kind, label) pairs, findings as (label, patient side) pairs, so a box that only
moved a little is no change while a finding on the other side is one. :class:`DiffSummary`
pools the per-study differences: how many studies changed, and per flag or finding how often
it was added or removed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cxr_auditor.schema import AuditResult

__all__ = ["DiffSummary", "ResultDiff", "diff_results"]


def _flags(result: AuditResult) -> set[tuple[str, str]]:
    return {(f.kind.value, f.label.value) for f in result.flags}


def _findings(result: AuditResult) -> set[tuple[str, str]]:
    return {
        (f.label.value, f.laterality.value if f.laterality else "-")
        for f in result.grounding.findings
    }


@dataclass(frozen=True)
class ResultDiff:
    """Differences from audit ``a`` to audit ``b`` of one study (added: in b, not in a)."""

    flags_added: list[tuple[str, str]]
    flags_removed: list[tuple[str, str]]
    findings_added: list[tuple[str, str]]
    findings_removed: list[tuple[str, str]]
    mode: tuple[str, str] | None = None
    grounding_state: tuple[str, str] | None = None

    @property
    def changed(self) -> bool:
        return bool(
            self.flags_added or self.flags_removed or self.findings_added
            or self.findings_removed or self.mode or self.grounding_state
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "flags_added": [list(x) for x in self.flags_added],
            "flags_removed": [list(x) for x in self.flags_removed],
            "findings_added": [list(x) for x in self.findings_added],
            "findings_removed": [list(x) for x in self.findings_removed],
            "mode": list(self.mode) if self.mode else None,
            "grounding_state": list(self.grounding_state) if self.grounding_state else None,
        }


def diff_results(a: AuditResult, b: AuditResult) -> ResultDiff:
    """The differences from ``a`` to ``b`` (sorted, so the output is stable)."""
    fa, fb = _flags(a), _flags(b)
    ga, gb = _findings(a), _findings(b)
    return ResultDiff(
        flags_added=sorted(fb - fa),
        flags_removed=sorted(fa - fb),
        findings_added=sorted(gb - ga),
        findings_removed=sorted(ga - gb),
        mode=(a.mode.value, b.mode.value) if a.mode is not b.mode else None,
        grounding_state=(a.grounding.state.value, b.grounding.state.value)
        if a.grounding.state is not b.grounding.state
        else None,
    )


@dataclass
class DiffSummary:
    """Per-study differences of two result sets, pooled."""

    studies: dict[str, ResultDiff] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    def add(self, key: str, a: AuditResult, b: AuditResult) -> ResultDiff:
        diff = diff_results(a, b)
        self.studies[key] = diff
        return diff

    def counts(self) -> dict[str, Counter[str]]:
        """How often each flag (``kind:label``) or finding (``label:side``) was added/removed."""
        out: dict[str, Counter[str]] = {
            name: Counter()
            for name in ("flags_added", "flags_removed", "findings_added", "findings_removed")
        }
        for diff in self.studies.values():
            for name, counter in out.items():
                counter.update(":".join(pair) for pair in getattr(diff, name))
        return out

    def as_dict(self) -> dict[str, Any]:
        changed = {k: d.as_dict() for k, d in sorted(self.studies.items()) if d.changed}
        return {
            "compared": len(self.studies),
            "changed": len(changed),
            "only_in_a": sorted(self.only_a),
            "only_in_b": sorted(self.only_b),
            "counts": {name: dict(sorted(c.items())) for name, c in self.counts().items()},
            "studies": changed,
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """``(what, added, removed)`` per flag and finding that changed anywhere."""
        counts = self.counts()
        rows: list[tuple[str, str, str]] = []
        for kind in ("flags", "findings"):
            added, removed = counts[f"{kind}_added"], counts[f"{kind}_removed"]
            for key in sorted(set(added) | set(removed)):
                rows.append((f"{kind[:-1]} {key}", str(added[key]), str(removed[key])))
        return rows
