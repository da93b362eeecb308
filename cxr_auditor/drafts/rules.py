"""The default draft parser: deterministic rules, CPU only, no model.

Pipeline for one draft (CONTRACT.md "Draft parsing"; the rules and their reasons are written up in
``docs/draft-parser.md``):

1. Split the text into sections (FINDINGS, IMPRESSION, ...). INDICATION, HISTORY, COMPARISON,
   TECHNIQUE and EXAMINATION sections hold no findings of this study and are skipped.
2. Split each kept section into sentences (full stops, blank lines, list items, and line breaks
   that start a new capitalised line; hard-wrapped lines are joined).
3. In each sentence find mentions (label terms, out-of-label terms, and phrases that carry their
   own status such as "heart size is normal") and triggers (negation, hedging, pseudo-negation,
   history/indication cues, scope terminators). A trigger's scope runs to the end of its clause
   and continues across a comma only into list items ("no effusion, consolidation, or
   pneumothorax"), never into a new assertion ("no pneumothorax, small left effusion").
4. Each mention gets ``absent`` when a negation covers it, else ``uncertain`` when a hedge covers
   it, else ``present``. A pronoun sentence that resolves ("It has now cleared.") denies what the
   sentence before named. One finding per label: ``present`` anywhere wins; otherwise the higher
   section wins (ADDENDUM > IMPRESSION > FINDINGS), then ``uncertain`` over ``absent`` over a
   finding explained away as an artefact ("likely a nipple shadow").
5. ``no_finding`` is present for an explicit normal statement, or for a normal heart plus clear
   lungs, and only while no label is present or uncertain.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from dataclasses import dataclass
from typing import Any

from cxr_auditor.drafts import _lexicon as lx
from cxr_auditor.drafts import scope
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.labels import POSITIVE_LABELS, Label, sort_labels
from cxr_auditor.schema import (
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Laterality,
    ModelInfo,
    UnmappedMention,
)

logger = logging.getLogger(__name__)

RULES_VERSION = "2.0"

NOTE_INFERRED_NORMAL = "no_finding inferred from a normal heart and clear lungs"
NOTE_NORMAL_OVERRIDDEN = "normal-study statement overridden by an asserted or hedged finding"

_PRESENT, _ABSENT, _UNCERTAIN = DraftStatus.PRESENT, DraftStatus.ABSENT, DraftStatus.UNCERTAIN
_LATERAL_LABELS = frozenset(POSITIVE_LABELS) - {Label.CARDIOMEGALY}
_HEDGES = frozenset({lx.Trig.PRE_HEDGE, lx.Trig.POST_HEDGE, lx.Trig.BI_HEDGE})
_BACKWARD = (lx.Trig.POST_NEG, lx.Trig.POST_HEDGE, lx.Trig.ARTEFACT, lx.Trig.UNASSESSED)
# Within one section: a hedge outranks a denial, which outranks an artefact explanation (0).
_WEIGHT = {_PRESENT: 3, _UNCERTAIN: 2, _ABSENT: 1}

_SENTENCE_END = re.compile(
    r"(?:[.!]|(?<=\w)\?)(?=[\s\"')\]]|\Z)"  # full stop before a space or the end ("? pna" is a hedge)
    r"|\r?\n[ \t]*\r?\n"  # blank line
    r"|\r?\n(?=[ \t]*(?:[-*\u2022\u00b7\u2023\u25aa\u25e6]|\d{1,2}[.)]\s))"  # list item
)
# A line break starts a new sentence when the next line opens a capitalised word and the line
# before does not end mid-phrase (reports are often hard-wrapped at ~80 columns).
_CAPITAL_LINE = re.compile(r"\r?\n(?=[ \t]*[A-Z][a-z])")
_WRAPPED_TAIL = re.compile(
    r"(?:[,(/-]|\b(?:and|or|of|the|with|without|to|in|at|is|are|was|were|no|for|a|an|by|on"
    r"|from|than|as|which|that|this|these|there|both|left|right|small|large|mild|moderate)"
    r")[ \t]*\Z"
)
_ABBREVIATION = re.compile(r"\b(?:dr|vs|mr|mrs|ms|st|approx|incl|e\.g|i\.e|fig|cf|esp)\Z")
_SPAN_TRIM = re.compile(r"\A[\s\-*\u2022\u00b7\u2023\u25aa\u25e6]*(?:\d{1,2}[.)]\s+)?")
MAX_SENTENCE = 1000
_ANSWER = re.compile(
    r"\s*(?:none|negative|not seen|no)(?:\s+(?:seen|identified|present|demonstrated|evident))?"
    r"\s*[.!]?\s*\Z"
)
# "It has resolved." / "These are no longer seen.": a pronoun subject whose finding was named in
# the sentence before.
_RESOLVED_PRONOUN = re.compile(
    r"\s*(?:it|this|these|they|this finding|these findings|the latter)\s+"
    r"(?:(?:has|have|had)\s+)?(?:(?:now|since|completely|entirely|fully|subsequently)\s+)?"
    r"(?:(?:been\s+)?(?:resolved|cleared)|(?:is|are)\s+(?:now\s+)?no\s+longer\s+"
    r"(?:seen|visible|present|evident|identified|demonstrated|apparent))\b"
)
_BARE_STRIP = " \t\r\n.!:*-"
_BARE_NORMAL = frozenset({"normal", "normal study", "normal exam", "negative", "unremarkable"})

# Where skipped sections end and where a statement starts in dictation without punctuation.
_SKIPPED = lx.SectionKind.IGNORE.value
# A line of three or more words that ends a sentence with a full stop (a dictated finding).
_DICTATED_LINE = re.compile(r"[ \t]*[A-Z][^\n.]*?[ \t][^\n.]*?[ \t][^\n.]*?\.(?:\s|\Z)")
# "Evaluation of the lungs shows consolidation": what the study shows is a finding.
_REPORTING_VERB = re.compile(r"\b(?:shows?|showed|demonstrates?|reveals?|revealed)\b")
# in or right after a hedge: "may represent", "likely represents", "may reflect"
_EXPLAINS = re.compile(r"\b(?:represent|reflect)")
# "no pneumothorax cardiomegaly is stable": a finding followed by its own verb is a subject.
_OWN_VERB = re.compile(r"[ \t]+(?:is|are|was|were|appears?|remains?|has|have)\b")
# "... versus infiltrate  small left effusion": a size word after a finding opens a new one.
_RUN_ON_OPENER = re.compile(
    r"[ \t]+(?=(?:small|moderate|large|mild|trace|tiny|minimal|new|increased|persistent)\b)"
)
# In a free-text section on one line, a sentence about the chest itself ends the indication
# ("Hx: fever, r/o pna. Lungs clear. No effusion.").
_FINDING_SENTENCE = re.compile(
    r"[.!?][ \t]+(?=(?:the )?(?:lungs?|lung fields?|heart|cardiac|cardiomediastinal|mediastin\w*"
    r"|pleura\w*|costophrenic|cp angles?|no|there (?:is|are)|bones?|osseous)\b)"
)
_INLINE_SENTENCE_END = re.compile(r"[.!?][ \t]+(?=[A-Z])")
# "CLINICAL QUESTION: ?effusion" then a line "None seen.": the answer starts the findings.
_ANSWER_LINE = re.compile(
    r"\r?\n(?=[ \t]*(?:none|negative)(?:[ \t]+(?:seen|identified|present|demonstrated|evident))?"
    r"[ \t]*(?:[.!]|\r?\n|\Z))"
)
_SIMILAR = re.compile(r"\bsimilar(?:[ \t]+[a-z]+)?[ \t]+\Z")

_LATERALITY_WORDS = {
    "left": Laterality.LEFT,
    "l": Laterality.LEFT,
    "right": Laterality.RIGHT,
    "r": Laterality.RIGHT,
    # lobes, as abbreviated in reports ("RLL consolidation"); the lingula is in the left lung
    "rul": Laterality.RIGHT,
    "rml": Laterality.RIGHT,
    "rll": Laterality.RIGHT,
    "lul": Laterality.LEFT,
    "lll": Laterality.LEFT,
    "lingula": Laterality.LEFT,
    "lingular": Laterality.LEFT,
}


@dataclass
class _Mention:
    targets: tuple[lx.Target, ...]
    start: int
    end: int
    status: DraftStatus
    fixed: bool
    indirect: bool
    shape: bool
    sentence: tuple[int, int]
    rank: int
    context: lx.Trig | None = None  # HISTORY or INDICATION when such a cue covers it
    withdrawn: bool = False  # hedged only by an artefact explanation
    laterality: Laterality | None = None

    def moved(self, offset: int) -> _Mention:
        """A copy ``offset`` characters further on (positional: the fastest copy)."""
        s0, s1 = self.sentence
        return _Mention(
            self.targets, self.start + offset, self.end + offset, self.status, self.fixed,
            self.indirect, self.shape, (s0 + offset, s1 + offset), self.rank, self.context,
            self.withdrawn, self.laterality,
        )


@dataclass(frozen=True)
class _Trigger:
    start: int
    end: int
    kind: lx.Trig


def _lower(text: str) -> str:
    """Lower-case without changing any offset (a few characters grow when lower-cased)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


def _sections(text: str, low: str) -> list[tuple[int, int, lx.SectionKind]]:
    """Cut the text into (start, end, kind) parts; text before any header counts as FINDINGS."""
    parts: list[tuple[int, int, lx.SectionKind, bool]] = []
    pos, kind, one_line = 0, lx.SectionKind.FINDINGS, False
    for m in lx.HEADER_RE.finditer(low):
        parts.append((pos, m.start(), kind, one_line))
        group = m.lastgroup or ""
        kind = lx.SECTION_KINDS.get(group, lx.SectionKind.FINDINGS)
        one_line = group in lx.LINE_SECTIONS
        pos = m.end()
    parts.append((pos, len(low), kind, one_line))
    out: list[tuple[int, int, lx.SectionKind]] = []
    for start, end, kind, one_line in parts:
        if kind is lx.SectionKind.IGNORE:
            # An indication ends at a paragraph break, a one-line section also where a new
            # sentence starts a line; text after it is a findings body.
            brk = _section_break(text, low, start, end, one_line)
            if brk is not None:
                out.append((start, brk, kind))
                out.append((brk, end, lx.SectionKind.FINDINGS))
                continue
        out.append((start, end, kind))
    return [p for p in out if p[1] > p[0]]


_PARAGRAPH = re.compile(r"\r?\n[ \t]*\r?\n|[.?!][ \t]*\r?\n")


def _section_break(text: str, low: str, start: int, end: int, one_line: bool) -> int | None:
    """Where a skipped section ends early: a paragraph break, or a line that starts with a
    capitalised word after a line with content that does not run on, as in sentence splitting.
    A one-line section (COMPARISON ...) ends at any such line ("Comparison: ___" then "The heart
    is enlarged.") and at its first sentence end ("Comparison: CT chest ___. The nodule ...");
    a free-text one (INDICATION ...) only at a line that reads as a dictated sentence of three
    or more words ("Hx: SOB" then "Cardiomegaly with vascular congestion."), so that a second
    indication line such as "Pneumonia?" stays in it, or at a sentence about the chest itself
    ("Hx: fever, r/o pna. Lungs clear.")."""
    cuts = []
    for m in (_PARAGRAPH.search(low, start, end), _ANSWER_LINE.search(low, start, end)):
        if m is not None:
            cuts.append(m.end())
    for line in _CAPITAL_LINE.finditer(text, start, end):
        if (
            low[start : line.start()].strip()
            and not _WRAPPED_TAIL.search(low, max(start, line.start() - 20), line.start())
            and (one_line or _DICTATED_LINE.match(text, line.end(), end))
        ):
            cuts.append(line.start())
            break
    inline = _INLINE_SENTENCE_END if one_line else _FINDING_SENTENCE
    for stop in inline.finditer(text if one_line else low, start, end):
        if not _ABBREVIATION.search(low, max(start, stop.start() - 6), stop.start()):
            cuts.append(stop.end())
            break
    cut = min(cuts, default=None)
    if cut is None or not low[cut:end].strip():
        return None
    return cut


def _sentences(text: str, low: str) -> list[tuple[int, int, int]]:
    """(start, end, rank) of every sentence; rank is the section kind's value (IGNORE is 0)."""
    out: list[tuple[int, int, int]] = []
    for start, end, kind in _sections(text, low):
        cuts = {end}
        for m in _SENTENCE_END.finditer(low, start, end):
            if m.group().startswith(".") and _ABBREVIATION.search(low, max(start, m.start() - 6),
                                                                 m.start()):
                continue
            cuts.add(m.end())
        for m in _CAPITAL_LINE.finditer(text, start, end):
            if not _WRAPPED_TAIL.search(low, max(start, m.start() - 20), m.start()):
                cuts.add(m.start())
        pos = start
        for cut in sorted(cuts):
            if low[pos:cut].strip():
                out.extend((a, b, kind.value) for a, b in _capped(low, pos, cut))
            pos = cut
    return out


def _capped(low: str, start: int, end: int) -> list[tuple[int, int]]:
    """Cut a sentence longer than MAX_SENTENCE after a comma (else at a space). No report sentence
    is that long; the cap keeps the per-sentence work (scopes are matched pairwise) linear in the
    text's length."""
    out = []
    while end - start > MAX_SENTENCE:
        cut = low.rfind(",", start + 1, start + MAX_SENTENCE) + 1
        if cut <= start + 1:
            cut = low.rfind(" ", start + 1, start + MAX_SENTENCE)
        cut = cut if cut > start else start + MAX_SENTENCE
        out.append((start, cut))
        start = cut
    out.append((start, end))
    return out


class _Sentence:
    """Mentions, triggers and scopes of one sentence."""

    def __init__(self, low: str, start: int, end: int, rank: int) -> None:
        self.low, self.start, self.end, self.rank = low, start, end, rank
        self.mentions = self._mentions()
        spans = [(m.start, m.end) for m in self.mentions if m.fixed]
        # Triggers only matter around a mention, so a sentence without one skips the scan.
        triggers = [
            _Trigger(ts, te, lx.TRIGGER_KINDS[i])
            for i, ts, te in (lx.TRIGGER_ALT.finditer(low, start, end) if self.mentions else ())
        ]
        self.triggers = [t for t in triggers if not any(s <= t.start < e for s, e in spans)]
        # A phrase's own words never negate it ("no acute process"), but a hedge inside it
        # ("heart size is likely normal") withdraws its confidence.
        self.hedged_phrases = {
            (s, e) for s, e in spans for t in triggers if t.kind in _HEDGES and s <= t.start < e
        }
        self.terminators = sorted(
            [t.start for t in self.triggers if t.kind is lx.Trig.TERMINATOR]
            + self._run_on_openers()
        )
        self.cues = [t.start for t in self.triggers if t.kind is not lx.Trig.TERMINATOR]
        self.negations = [t.start for t in self.triggers if t.kind is lx.Trig.PRE_NEG]

    def _run_on_openers(self) -> list[int]:
        """Dictation without punctuation: a size word right after a finding ("... versus
        infiltrate  small left effusion cannot be excluded"), or a finding right after another
        that is the subject of its own verb ("no pneumothorax cardiomegaly is stable"), starts
        a new statement."""
        low, found = self.low, self.mentions
        sized = [
            o.end() for m in found if (o := _RUN_ON_OPENER.match(low, m.end, self.end)) is not None
        ]
        subjects = [
            m.start
            for prev, m in itertools.pairwise(found)
            if prev.end <= m.start
            and not low[prev.end : m.start].strip()
            # "mass lesion is ...": two words for one finding are one noun phrase
            and not set(prev.targets) & set(m.targets)
            and _OWN_VERB.match(low, m.end, self.end)
        ]
        return sized + subjects

    def _mentions(self) -> list[_Mention]:
        low, s, e = self.low, self.start, self.end
        found: list[_Mention] = []
        for i, ms, me in lx.PHRASE_ALT.finditer(low, s, e):
            found.append(self._new(lx.PHRASES[i], ms, me))
        body = low[s:e]
        word = body.strip(_BARE_STRIP)
        if word in _BARE_NORMAL:
            lead = len(body) - len(body.lstrip(_BARE_STRIP))
            found.append(
                _Mention((Label.NO_FINDING,), s + lead, s + lead + len(word), _PRESENT, True,
                         False, False, (s, e), self.rank)
            )
        for i, ms, me in lx.TERM_ALT.finditer(low, s, e):
            entry = lx.TERMS[i]
            if any(
                f.start < me and ms < f.end and set(f.targets) & set(entry.targets) for f in found
            ):
                continue
            found.append(self._new(entry, ms, me))
        found.sort(key=lambda x: x.start)
        return found

    def _new(self, entry: lx.Entry, start: int, end: int) -> _Mention:
        return _Mention(
            entry.targets, start, end, entry.fixed or _PRESENT, entry.fixed is not None,
            entry.indirect, entry.shape, (self.start, self.end), self.rank,
        )

    # --- scopes ------------------------------------------------------------------------------
    def _forward_limit(self, trig: _Trigger) -> int:
        stops = self.terminators
        explains = _EXPLAINS.search(self.low, trig.start, min(trig.end + 12, self.end))
        if trig.kind is lx.Trig.PRE_HEDGE and explains:
            # "likely represents atelectasis and small effusion": the explanation is the whole
            # coordinated phrase, so "and small" does not end it
            stops = [p for p in stops if not self.low.startswith(("and", "with"), p)]
        if trig.kind in (lx.Trig.HISTORY, lx.Trig.INDICATION):
            # "status post chest tube removal  no significant effusion", "f/u PNA: improving
            # consolidation", "evaluation of the lungs shows ...": a negation, a colon or a
            # reporting verb starts a statement about this study
            colons = [i for i in range(trig.end, self.end) if self.low[i] == ":"]
            verbs = [m.start() for m in _REPORTING_VERB.finditer(self.low, trig.end, self.end)]
            stops = stops + self.negations + colons + verbs
        limit = min([p for p in stops if p >= trig.end] + [self.end])
        return scope.forward_end(self.low, trig.end, limit, self.cues)

    def _backward_limit(self, trig: _Trigger) -> int:
        lo = max([p + 1 for p in self.terminators if p < trig.start] + [self.start])
        return scope.backward_start(self.low, lo, trig.start)

    def _covered(self, trig: _Trigger) -> list[_Mention]:
        """The mentions a trigger applies to."""
        kind = trig.kind
        # A cue between a term's subject and its verdict ("heart size is likely enlarged").
        inside = [m for m in self.mentions if m.start < trig.start and trig.end <= m.end]
        if inside:
            return inside
        before: list[_Mention] = []
        if kind in _BACKWARD or kind in (lx.Trig.BI_NEG, lx.Trig.BI_HEDGE):
            lo = self._backward_limit(trig)
            before = [m for m in self.mentions if m.start >= lo and m.end <= trig.start]
        if kind is lx.Trig.ARTEFACT and not before:
            # "A nodule projects over the left lung, ..., and may represent a nipple shadow":
            # an explanation with its subject left out explains the sentence's last finding
            before = self._last_before(trig)
        if kind in _BACKWARD:
            return before
        is_versus = kind is lx.Trig.BI_HEDGE and self.low.startswith(("versus", "vs"), trig.start)
        # "blunting, ? pleural thickening or minimal effusion": a "?" that opens a comma piece
        # asks about what follows it
        asks_forward = (
            kind is lx.Trig.BI_HEDGE and self.low[self.start : trig.start].rstrip().endswith(",")
        )
        bi = kind in (lx.Trig.BI_NEG, lx.Trig.BI_HEDGE)
        if bi and before and not is_versus and not asks_forward:
            return before
        hi = self._forward_limit(trig)
        after = [m for m in self.mentions if m.start >= trig.end and m.start < hi]
        if is_versus:
            left = [m for m in before[-1:] if scope.versus_reaches(self.low, m.end, trig.start)]
            return left + after
        return after

    def _last_before(self, trig: _Trigger) -> list[_Mention]:
        """The last finding term before a trigger, within its terminators."""
        lo = max([p + 1 for p in self.terminators if p < trig.start] + [self.start])
        terms = [m for m in self.mentions if not m.fixed and lo <= m.start and m.end <= trig.start]
        return terms[-1:]

    def _repeats_earlier(self, m: _Mention) -> bool:
        """"... a nipple shadow, as a similar nodule is seen on the left": "similar" points back
        to a finding of the same kind earlier in the sentence, which speaks for both."""
        if m.fixed or not _SIMILAR.search(self.low, max(self.start, m.start - 20), m.start):
            return False
        return any(
            o.end <= m.start and set(o.targets) & set(m.targets) for o in self.mentions
        )

    def resolve(self) -> list[_Mention]:
        negated: set[int] = set()
        answered: set[int] = set()  # "evaluate for pneumothorax: none seen"
        hedged: set[int] = set()
        explained: set[int] = set()  # hedged by "likely a nipple shadow" and the like
        context: dict[int, lx.Trig] = {}
        for trig in self.triggers:
            if trig.kind is lx.Trig.PSEUDO:
                # "No enlargement of the cardiac silhouette": the change word opens the mention
                # itself, so the "no" denies it rather than describing a change.
                if self.low.startswith(("no", "without"), trig.start):
                    negated.update(
                        id(m) for m in self.mentions if trig.start < m.start < trig.end
                    )
                continue
            if trig.kind is lx.Trig.TERMINATOR:
                continue
            for m in self._covered(trig):
                key = id(m)
                if trig.kind in (lx.Trig.HISTORY, lx.Trig.INDICATION):
                    context.setdefault(key, trig.kind)
                elif trig.kind is lx.Trig.UNASSESSED:
                    context.setdefault(key, lx.Trig.INDICATION)
                elif trig.kind in (lx.Trig.PRE_NEG, lx.Trig.POST_NEG, lx.Trig.BI_NEG):
                    negated.add(key)
                    if trig.kind is lx.Trig.POST_NEG:
                        answered.add(key)
                elif trig.kind is lx.Trig.ARTEFACT:
                    explained.add(key)
                else:
                    hedged.add(key)
        for key in answered:
            if context.get(key) is lx.Trig.INDICATION:
                del context[key]
        hedged.update(id(m) for m in self._signs_with_hedged_cause())
        out: list[_Mention] = []
        for m in self.mentions:
            if m.indirect and self._explained(m) or self._repeats_earlier(m):
                continue  # the explicit or earlier mention in its clause speaks for it
            key = id(m)
            m.context = context.get(key)
            if m.fixed and m.status is _ABSENT and (m.start, m.end) in self.hedged_phrases:
                m.status = _UNCERTAIN
            if not m.fixed:
                if key in negated:
                    m.status = _ABSENT
                elif key in hedged or key in explained:
                    m.status = _UNCERTAIN
                    m.withdrawn = key not in hedged
            m.laterality = self._laterality(m)
            out.append(m)
        return out

    def _signs_with_hedged_cause(self) -> list[_Mention]:
        """Indirect signs followed in their clause by a hedged cause ("blunting ..., likely due to
        pleural thickening"): the sign itself is then only a possible finding."""
        signs = [m for m in self.mentions if m.indirect and not m.shape]
        if not signs:
            return []
        causes = [t for t in self.triggers if t.kind in (lx.Trig.PRE_HEDGE, lx.Trig.BI_HEDGE)]
        return [
            m for m in signs
            if any(
                t.start >= m.end
                and not any(m.end <= p < t.start for p in self.terminators)
                and any(c is not m for c in self._covered(t))
                for t in causes
            )
        ]

    def _explained(self, sign: _Mention) -> bool:
        """Is an indirect sign named outright in its own clause ("blunting ... effusion")?"""
        for m in self.mentions:
            if m.indirect or m.fixed or not set(m.targets) & set(sign.targets):
                continue
            lo, hi = min(m.start, sign.start), max(m.start, sign.start)
            if not any(lo < p < hi for p in self.terminators):
                return True
        return False

    def _laterality(self, m: _Mention) -> Laterality | None:
        if not set(m.targets) & _LATERAL_LABELS:
            return None
        prev_end = max([o.end for o in self.mentions if o.end <= m.start] + [self.start])
        next_start = min([o.start for o in self.mentions if o.start >= m.end] + [self.end])
        for lo, hi in ((prev_end, m.end), (m.end, next_start)):
            sides = {
                lx_.group() for lx_ in lx.LATERALITY_RE.finditer(self.low, lo, hi)
            }
            if sides:
                found = {_LATERALITY_WORDS.get(w, Laterality.BILATERAL) for w in sides}
                if Laterality.BILATERAL in found or len(found) > 1:
                    return Laterality.BILATERAL
                return found.pop()
        return None


def _answer_question(question: list[_Mention], end: int, rank: int) -> None:
    """A bare "None seen." answers the question just before it ("Assess for pneumothorax.", or
    "CLINICAL QUESTION: Pneumothorax after line placement?"), with the answer's section rank."""
    for m in question:
        if m.context is lx.Trig.INDICATION and not m.fixed:
            m.context, m.status, m.rank = None, _ABSENT, rank
            m.sentence = (m.sentence[0], end)


def _resolve_antecedent(antecedent: list[_Mention], end: int) -> None:
    """"It has resolved." denies what the sentence just before asserted or hedged."""
    for m in antecedent:
        if not m.fixed and m.context is None and m.status is not _ABSENT:
            m.status = _ABSENT
            m.sentence = (m.sentence[0], end)


def _span(text: str, sentence: tuple[int, int]) -> tuple[int, int]:
    """The sentence without surrounding blanks, list markers and its closing full stop."""
    start, end = sentence
    body = text[start:end]
    lead = _SPAN_TRIM.match(body)
    s = start + (lead.end() if lead else 0)
    e = start + len(body.rstrip(" \t\r\n.;,"))
    return (s, e) if e > s else sentence


def _choose(cands: list[_Mention]) -> _Mention:
    """Present anywhere wins (a sign such as costophrenic blunting only while the label is not
    hedged outright elsewhere); else the higher section, then uncertain over absent (but absent
    over a finding explained away as an artefact), then first."""
    present = [c for c in cands if c.status is _PRESENT]
    hedged = [c for c in cands if c.status is _UNCERTAIN and not c.indirect]
    if present and hedged and all(c.indirect and not c.shape for c in present):
        # A sign alone ("blunting of the costophrenic angle") yields to the report's own hedged
        # reading of it elsewhere ("possibly trace effusion").
        present, cands = [], hedged
    if present:
        return max(present, key=lambda c: (c.rank, -c.start))
    return max(cands, key=lambda c: (c.rank, 0 if c.withdrawn else _WEIGHT[c.status], -c.start))


class RulesDraftParser(DraftParser):
    """Deterministic rule-based parser (the default); see the module docstring for the rules."""

    name = "rules"
    info = ModelInfo(
        profile="rules", task="draft_parsing", backend="rules", revision=RULES_VERSION
    )

    def parse(self, text: str) -> DraftResult:
        """Parse one draft. Empty or blank text gives state ``none``; never raises on a str."""
        if not isinstance(text, str) or not text.strip():
            return DraftResult(state=DraftState.NONE, parser=self.name)
        low = _lower(text)
        mentions: list[_Mention] = []
        previous: list[_Mention] = []
        question: tuple[int, int] | None = None  # the skipped sentence just before, if any
        for start, end, rank in _sentences(text, low):
            if rank == _SKIPPED:
                # an indication asserts nothing; it is read only if a bare "None seen." answers it
                question, previous = (start, end), []
                continue
            found = _sentence_mentions(low, start, end, rank)
            if not found and _ANSWER.match(low, start, end):
                if question is not None:
                    previous = _sentence_mentions(low, *question, rank)
                    for m in previous:
                        m.context = lx.Trig.INDICATION
                    mentions.extend(previous)
                _answer_question(previous, end, rank)
            elif not found and _RESOLVED_PRONOUN.match(low, start, end):
                _resolve_antecedent(previous, end)
            mentions.extend(found)
            previous, question = found, None
        result = _assemble(text, mentions, self.name)
        logger.debug(
            "parsed draft: %d chars, %d findings, %d unmapped",
            len(text), len(result.findings), len(result.unmapped_mentions),
        )
        return result


#: Sentences whose reading is kept. Real report sets repeat template sentences ("No
#: pneumothorax.", "Heart size is normal."): benchmarks/draft_parser.py prints how many
#: readings one pass over a report set takes from the cache.
SENTENCE_CACHE_SIZE = 8192


@functools.lru_cache(maxsize=SENTENCE_CACHE_SIZE)
def _read_sentence(sentence: str, rank: int) -> tuple[_Mention, ...]:
    """The resolved mentions of one lower-cased sentence, offsets relative to its start.

    A sentence is read on its own text (its scopes never cross its ends), so the reading
    depends on nothing else and is cached; callers get rebased copies, never these objects.
    """
    return tuple(_Sentence(sentence, 0, len(sentence), rank).resolve())


def clear_sentence_cache() -> None:
    """Forget every cached sentence reading (benchmarks measure a cold pass with it)."""
    _read_sentence.cache_clear()


def sentence_cache_hit_rate() -> float:
    """Share of sentence readings served from the cache since it was last cleared."""
    info = _read_sentence.cache_info()
    reads = info.hits + info.misses
    return info.hits / reads if reads else 0.0


def _sentence_mentions(low: str, start: int, end: int, rank: int) -> list[_Mention]:
    """The resolved mentions of ``low[start:end]``, as fresh objects at their offsets.

    The cache key leaves out the blanks around the sentence (its offset moves instead), so
    "No pneumothorax." reads once whether a report starts with it or a line break precedes it.
    """
    sentence = low[start:end]
    stripped = sentence.lstrip()
    offset = start + len(sentence) - len(stripped)
    return [m.moved(offset) for m in _read_sentence(stripped.rstrip(), rank)]


def _assemble(text: str, mentions: list[_Mention], parser: str) -> DraftResult:
    labels: dict[Label, list[_Mention]] = {}
    unmapped: dict[str, list[_Mention]] = {}
    for m in mentions:
        if m.context is lx.Trig.INDICATION:
            continue
        for target in m.targets:
            if isinstance(target, Label):
                if m.context is lx.Trig.HISTORY:
                    unmapped.setdefault(f"history_of_{target.value}", []).append(m)
                else:
                    labels.setdefault(target, []).append(m)
            else:
                unmapped.setdefault(target, []).append(m)

    chosen = {lab: _sided(_choose(c), c) for lab, c in labels.items()}
    chosen_unmapped = {term: _choose(c) for term, c in unmapped.items()}
    notes: list[str] = []
    # a finding explained away as an artefact ("likely a nipple shadow") does not outweigh an
    # explicit normal-study statement, though it still stops one being inferred (below)
    asserted = any(
        chosen[lab].status is not _ABSENT and not chosen[lab].withdrawn
        for lab in POSITIVE_LABELS
        if lab in chosen
    )
    normal = chosen.pop(Label.NO_FINDING, None)
    if normal is not None and asserted:
        notes.append(NOTE_NORMAL_OVERRIDDEN)
        normal = None
    # A finding explained away as an artefact was still seen: no normal study is inferred.
    seen = any(m.withdrawn and m.context is not lx.Trig.INDICATION for m in mentions)
    if normal is None and not asserted and not seen and _looks_normal(chosen, chosen_unmapped):
        normal = chosen[Label.LUNG_OPACITY_CONSOLIDATION]
        notes.append(NOTE_INFERRED_NORMAL)
    findings = [_finding(text, lab, chosen[lab]) for lab in sort_labels(chosen)]
    if normal is not None:
        findings.append(_finding(text, Label.NO_FINDING, normal, _PRESENT))
    order = sorted(chosen_unmapped.items(), key=lambda kv: min(m.start for m in unmapped[kv[0]]))
    extras = []
    for term, m in order:
        s, e = _span(text, m.sentence)
        extras.append(UnmappedMention(term=term, status=m.status, span=text[s:e], start=s, end=e))
    return DraftResult(
        state=DraftState.PARSED, parser=parser, findings=findings, unmapped_mentions=extras,
        notes=notes,
    )


def _sided(chosen: _Mention, cands: list[_Mention]) -> _Mention:
    """The deciding statement, or, when it names no side, the highest-ranked statement of the same
    status that does ("FINDINGS: Small left effusion. IMPRESSION: Small effusion." is a left
    effusion with the findings sentence as its span, so the span states the side)."""
    if chosen.laterality is not None:
        return chosen
    sided = [c for c in cands if c.status is chosen.status and c.laterality is not None]
    return max(sided, key=lambda c: (c.rank, -c.start)) if sided else chosen


def _looks_normal(chosen: dict[Label, _Mention], unmapped: dict[str, _Mention]) -> bool:
    """A normal heart and clear lungs, with nothing abnormal outside the label space either."""
    heart = chosen.get(Label.CARDIOMEGALY)
    lungs = chosen.get(Label.LUNG_OPACITY_CONSOLIDATION)
    if heart is None or lungs is None or heart.status is not _ABSENT or lungs.status is not _ABSENT:
        return False
    return all(
        m.status is _ABSENT
        or term in lx.INCIDENTAL_TERMS
        or term.startswith("history_of_")
        or m.context is lx.Trig.HISTORY  # "history of breast cancer"
        for term, m in unmapped.items()
    )


def _finding(
    text: str, label: Label, m: _Mention, status: DraftStatus | None = None
) -> DraftFinding:
    s, e = _span(text, m.sentence)
    return DraftFinding(
        label=label, status=status or m.status, span=text[s:e], start=s, end=e,
        laterality=m.laterality if label in _LATERAL_LABELS else None,
    )


_DEFAULT = RulesDraftParser()


def parse_draft(text: str) -> DraftResult:
    """Parse one draft with the default rules parser."""
    return _DEFAULT.parse(text)


def as_records(result: DraftResult) -> list[dict[str, Any]]:
    """Findings as plain dicts ``{label, status, span, start, end[, laterality]}``."""
    return [f.model_dump(mode="json", exclude_none=True) for f in result.findings]
