"""A plain sentence-scoped NegEx: the baseline the rules parser is measured against.

Chapman et al.'s NegEx (J Biomed Inform 2001) in its simplest common form, with the rules
parser's own label lexicon so that only the scope logic differs:

- sentences end at a full stop, "!", "?", ";", or a line break;
- a **pre** trigger ("no", "without", "negative for", ...) negates every finding after it in the
  sentence, a **post** trigger ("is not seen", "ruled out") every finding before it;
- hedge triggers ("possible", "may represent", "cannot be excluded") make what they cover
  uncertain the same way; a negation wins over a hedge;
- **pseudo** triggers ("no change", "not only") are skipped, and a **termination** word ("but",
  "however", "although", "except", "which") ends a trigger's reach within the sentence;
- one finding per label: present anywhere wins, then uncertain, then absent; ``no_finding`` is
  present for a normal-study phrase while no other label is present or uncertain.

It has no list or clause model, no sections and no cross-sentence logic: that is the point of a
baseline. ``python -m cxr_auditor.eval.drafts`` runs it beside the rules parser.
"""

from __future__ import annotations

import re

from cxr_auditor.drafts import _lexicon as lx
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.labels import Label, sort_labels
from cxr_auditor.schema import DraftFinding, DraftResult, DraftState, DraftStatus, ModelInfo

_PRESENT, _ABSENT, _UNCERTAIN = DraftStatus.PRESENT, DraftStatus.ABSENT, DraftStatus.UNCERTAIN

_SENTENCE = re.compile(r"[^.!?;\n]+")

PRE_NEGATION = (
    r"no evidence of|no signs? of|negative for|free of|absence of|without|\bno\b|\bnot\b"
    r"|\bnor\b|\bneither\b|denies|resolution of|clear of"
)
POST_NEGATION = (
    r"(?:is|are|was|were) not (?:seen|identified|present|visualized|demonstrated|evident|noted)"
    r"|not (?:seen|identified|present)|ruled out|excluded|absent|resolved|none"
)
PRE_HEDGE = (
    r"possibl[ey]|probabl[ey]|likely|questionabl[ey]|suspicious for|suspected|concerning for"
    r"|may represent|may be|might|could|suggest(?:s|ive of)?|cannot (?:be )?(?:excluded|exclude|"
    r"ruled out|rule out)|versus|\bvs\b|equivocal|\?"
)
POST_HEDGE = r"(?:cannot|can not|not) be (?:excluded|ruled out)|is (?:possible|suspected|likely)"
PSEUDO = r"no (?:significant |interval )?(?:change|increase|decrease|worsening)|not only"
TERMINATION = r"\bbut\b|however|although|\bthough\b|except|\bwhich\b|\bwhereas\b"

_TRIGGER = re.compile(
    "|".join(
        f"(?P<{name}>{pattern})"
        for name, pattern in (
            ("pseudo", PSEUDO),
            ("post_hedge", POST_HEDGE),
            ("post_neg", POST_NEGATION),
            ("pre_neg", PRE_NEGATION),
            ("pre_hedge", PRE_HEDGE),
            ("term", TERMINATION),
        )
    )
)


class NegExDraftParser(DraftParser):
    """Sentence-scoped NegEx over the rules parser's lexicon (the evaluation baseline)."""

    name = "negex"
    info = ModelInfo(profile="negex", task="draft_parsing", backend="rules", revision="baseline")

    def parse(self, text: str) -> DraftResult:
        if not isinstance(text, str) or not text.strip():
            return DraftResult(state=DraftState.NONE, parser=self.name)
        low = text.lower()
        best: dict[Label, tuple[DraftStatus, int, int]] = {}
        for sent in _SENTENCE.finditer(low):
            for label, status, start, end in _sentence(low, sent.start(), sent.end()):
                old = best.get(label)
                if old is None or _RANK[status] > _RANK[old[0]]:
                    best[label] = (status, start, end)
        normal = best.pop(Label.NO_FINDING, None)
        if normal is not None and any(s is not _ABSENT for s, _, _ in best.values()):
            normal = None
        findings = [
            DraftFinding(label=lab, status=st, span=text[s:e], start=s, end=e)
            for lab in sort_labels(best)
            for st, s, e in [best[lab]]
        ]
        if normal is not None:
            _, s, e = normal
            findings.append(
                DraftFinding(label=Label.NO_FINDING, status=_PRESENT, span=text[s:e], start=s, end=e)
            )
        return DraftResult(state=DraftState.PARSED, parser=self.name, findings=findings)


_RANK = {_PRESENT: 3, _UNCERTAIN: 2, _ABSENT: 1}


def _sentence(low: str, start: int, end: int) -> list[tuple[Label, DraftStatus, int, int]]:
    """(label, status, sentence start, sentence end) of every label mention in one sentence."""
    mentions: list[tuple[int, int, tuple[lx.Target, ...], DraftStatus | None]] = []
    for i, ms, me in lx.PHRASE_ALT.finditer(low, start, end):
        mentions.append((ms, me, lx.PHRASES[i].targets, lx.PHRASES[i].fixed))
    for i, ms, me in lx.TERM_ALT.finditer(low, start, end):
        if not any(s < me and ms < e for s, e, _, _ in mentions):
            mentions.append((ms, me, lx.TERMS[i].targets, None))
    if not mentions:
        return []
    triggers = [
        (m.start(), m.end(), m.lastgroup or "") for m in _TRIGGER.finditer(low, start, end)
    ]
    terms = [s for s, _, kind in triggers if kind == "term"]
    body = low[start:end]
    lead = start + len(body) - len(body.lstrip())
    trail = start + len(body.rstrip())
    out = []
    for ms, me, targets, fixed in mentions:
        status = fixed or _status(ms, me, triggers, terms)
        for target in targets:
            if isinstance(target, Label):
                out.append((target, status, lead, trail))
    return out


def _status(
    ms: int, me: int, triggers: list[tuple[int, int, str]], terms: list[int]
) -> DraftStatus:
    negated = hedged = False
    for ts, te, kind in triggers:
        if kind.startswith("pre") and te <= ms and not any(ts < t < ms for t in terms):
            negated |= kind == "pre_neg"
            hedged |= kind == "pre_hedge"
        elif kind.startswith("post") and ts >= me and not any(me < t < ts for t in terms):
            negated |= kind == "post_neg"
            hedged |= kind == "post_hedge"
    if negated:
        return _ABSENT
    return _UNCERTAIN if hedged else _PRESENT
