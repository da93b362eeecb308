"""Report-style grounding output (explain-my-xray) → findings with boxes.

The ExplainMyXray adapter answers "Locate abnormalities." with a text report in FINDINGS /
LOCATIONS / IMPRESSION sections, writing each box as four PaliGemma ``<locNNNN>`` tokens
(``y0 x0 y1 x1``, 0–1023 bins). Labels come from the report text through the rule-based draft
parser (the same negation, hedging and normal-study rules a draft gets); each box is attached to
the label named in its own line or sentence. The report text itself is kept in
``GroundingResult.report_text``.
"""

from __future__ import annotations

import re

from cxr_auditor.drafts.rules import RulesDraftParser
from cxr_auditor.errors import ParseError
from cxr_auditor.labels import Label, normalize_label
from cxr_auditor.parsing import LOC_TOKEN_RE, loc_tokens_to_boxes, strip_reasoning
from cxr_auditor.schema import (
    Box,
    DraftFinding,
    DraftState,
    DraftStatus,
    GroundingResult,
    GroundingState,
    ImageFinding,
    Laterality,
)

__all__ = ["ReportParser"]

# A box belongs to the clause around it: clauses end at a line break, a semicolon, or a full
# stop followed by white space (so "0.5" or "<loc0512>." do not split).
_CLAUSE_END_RE = re.compile(r"\n|;|\.(?=\s)")
_SPACES_RE = re.compile(r"[ \t]{2,}")
# White space a removed box leaves before punctuation or a line end.
_DANGLING_RE = re.compile(r"[ \t]+(?=[.,;:]|\n|$)")


def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each span replaced by spaces of the same length (offsets stay valid)."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _clause(text: str, start: int, end: int) -> tuple[int, int]:
    """Bounds of the clause holding ``text[start:end]``."""
    left = 0
    for match in _CLAUSE_END_RE.finditer(text, 0, start):
        left = match.end()
    nxt = _CLAUSE_END_RE.search(text, end)
    return left, nxt.start() if nxt else len(text)


class ReportParser:
    """Parse one report answer into a :class:`GroundingResult` for one image.

    ``labels`` maps extra report terms (lower case) onto canonical labels, for words the rule
    parser does not know.
    """

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.rules = RulesDraftParser()
        self.extra = {term.lower(): Label(label) for term, label in (labels or {}).items()}

    def _mentions(self, text: str) -> list[DraftFinding]:
        result = self.rules.parse(text)
        if result.state is not DraftState.PARSED:
            return []
        return list(result.findings)

    def _extra_labels(self, clause: str) -> list[tuple[Label, int]]:
        lowered = clause.lower()
        return [(lab, lowered.find(t)) for t, lab in self.extra.items() if t in lowered]

    def _label_for_box(self, blanked: str, start: int, end: int) -> Label | None:
        """The label named in the box's clause: the last one before the box, else the first
        after it. Denied labels are skipped."""
        lo, hi = _clause(blanked, start, end)
        clause = blanked[lo:hi]
        named = [
            (f.label, f.start)
            for f in self._mentions(clause)
            if f.status is not DraftStatus.ABSENT and f.label is not Label.NO_FINDING
        ]
        if not named:
            named = [(lab, at) for lab, at in self._extra_labels(clause) if lab is not Label.NO_FINDING]
        if not named:
            # "Left pleural effusion:" in a LOCATIONS list may be bare enough to be a label name.
            guess = normalize_label(LOC_TOKEN_RE.sub("", clause).split(":")[0])
            return guess if guess not in (None, Label.NO_FINDING) else None
        box_at = start - lo
        before = [item for item in named if item[1] < box_at]
        return (before[-1] if before else named[0])[0]

    def parse(self, text: str, image_index: int = 0) -> GroundingResult:
        """Findings of one report. Raises ParseError when the answer holds no text at all."""
        answer = strip_reasoning(text)
        boxes = loc_tokens_to_boxes(answer)
        stray = [(m.start(), m.end()) for m in LOC_TOKEN_RE.finditer(answer)]
        blanked = _blank(answer, stray)
        report = _DANGLING_RE.sub("", _SPACES_RE.sub(" ", blanked)).strip()
        if not report:
            raise ParseError("report answer holds no text", raw_text=text)
        notes: list[str] = []
        if len(stray) != 4 * len(boxes):
            notes.append("loc_tokens_dropped:incomplete_or_invalid")

        mentions = self._mentions(blanked)
        denied = {f.label for f in mentions if f.status is DraftStatus.ABSENT}
        present = [f.label for f in mentions if f.status is DraftStatus.PRESENT]
        # The side stated in words stays on findings without a box (boxes get theirs from the
        # image geometry in the pipeline).
        sides: dict[Label, Laterality] = {}
        for f in mentions:
            if f.status is DraftStatus.PRESENT and f.laterality is not None:
                sides.setdefault(f.label, f.laterality)
        if any(f.status is DraftStatus.UNCERTAIN for f in mentions):
            notes.append("hedged_mentions_not_reported")
        for lab, _ in self._extra_labels(blanked):
            if lab not in denied:
                present.append(lab)

        boxed: dict[Label, list[Box]] = {}
        for box, start, end in boxes:
            label = self._label_for_box(blanked, start, end)
            if label is None or label in denied:
                notes.append("box_unattached")
                continue
            boxed.setdefault(label, []).append(box)

        findings: list[ImageFinding] = []
        for label in dict.fromkeys([*present, *boxed]):
            if label is Label.NO_FINDING:
                continue
            label_boxes: list[Box | None] = [*boxed.get(label, [])] or [None]
            for label_box in label_boxes:
                side = sides.get(label) if label_box is None else None
                findings.append(
                    ImageFinding(
                        label=label, image_index=image_index, box=label_box, laterality=side
                    )
                )
        if not findings and Label.NO_FINDING in present:
            findings.append(ImageFinding(label=Label.NO_FINDING, image_index=image_index))
        elif findings and Label.NO_FINDING in present:
            notes.append("no_finding_with_positives:positives_kept")
        if not findings:
            notes.append("no_usable_finding")
            return GroundingResult(
                state=GroundingState.INCONCLUSIVE, notes=notes, report_text=report
            )
        return GroundingResult(
            state=GroundingState.OK, findings=findings, notes=notes, report_text=report
        )
