"""Coordination: how far a negation or hedge reaches across a list inside one clause.

Clause boundaries (terminators such as "but", "however", ";", a new subject with its own verb)
are found by the rules parser; inside one clause a cue's scope is cut at commas into *pieces*,
and each piece is classified as a **member** of the list the cue governs or as the start of a
**new statement**. The decision is a small table, not a set of special cases:

=====================  ==============================================================  ===========
piece starts with       example                                                          decision
=====================  ==============================================================  ===========
"or" / "nor"            "no effusion, consolidation, **or pneumothorax**"                member
a cue of its own        "no effusion, **possible** consolidation"                        new
a clause verb           "no effusion, **there is** atelectasis"                          new
an assertive modifier   "no pneumothorax, **small** left effusion"                       new, unless
  or a new subject                                                                       the list is
                                                                                         closed
a deniable modifier     "no consolidation, **large** effusion or pneumothorax"           member
a bare noun phrase      "no consolidation, **pneumothorax** or effusion"                 member
=====================  ==============================================================  ===========

A list is *closed* when "or" or "nor" joins its last member somewhere in the scope ("no
consolidation, pneumothorax or large effusion", with or without an Oxford comma): an "or" list
after a negation is a list of denied alternatives, so an assertive-looking modifier inside it
("no pneumothorax, small or large effusion") does not open a new statement. "and" alone does
not close a list, because "no pneumothorax, small effusion and atelectasis" asserts the last two.

The same table runs backwards for cues that follow their findings ("effusion, consolidation or
pneumothorax is not seen"): the pieces before the cue's own piece belong to it only when that
piece ends a list (it holds "or", "and" or "nor", with or without an Oxford comma).

The word lists are in this module, each with its reason; docs/draft-parser.md ("Scope model")
describes the whole design.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence

#: Conjunctions that close a list of alternatives: every member is governed by the same cue.
CLOSING = frozenset({"or", "nor"})
#: Conjunctions that join list members ("and" joins, but does not prove a list of alternatives).
JOINING = CLOSING | {"and", "and/or"}

#: Modifiers that describe a finding that is there: after a bare comma they open a new statement
#: ("no pneumothorax, small left effusion"), inside a closed list they are a denied alternative.
ASSERTIVE = frozenset(
    {
        "small", "smaller", "moderate", "moderately", "mild", "mildly", "severe", "severely",
        "trace", "tiny", "minimal", "minimally", "slight", "slightly", "new", "increased",
        "increasing", "persistent", "persisting", "stable", "unchanged", "massive", "enlarged",
        "residual", "worsening", "worsened", "improved", "improving", "decreased", "decreasing",
        "developing", "redemonstrated", "again", "known", "chronic", "bilateral", "bibasilar",
        "left", "right", "there", "the", "a", "an", "this", "these", "some", "several", "multiple",
        "few", "numerous", "both",
    }
)
#: Verbs that make a piece a clause of its own ("no effusion, the heart is enlarged"). A piece
#: with "or"/"nor" before its verb stays a member: the verb then closes the list ("no effusion,
#: consolidation, or pneumothorax is seen", "no infiltrate, pneumothorax or effusion identified").
CLAUSE_VERBS = frozenset(
    {
        "is", "are", "was", "were", "has", "have", "had", "appears", "appear", "remains",
        "remain", "demonstrates", "shows", "show", "seen", "noted", "present", "demonstrated",
        "identified", "visualized", "visualised", "persists", "persist", "measures", "measuring",
        "projects", "projecting", "overlies", "overlying", "represents", "suggests",
    }
)
#: Words that end a noun phrase's reach to its right: "opacities representing infection versus
#: chronic disease" offers infection or chronic disease, not the opacities.
PHRASE_BREAKERS = CLAUSE_VERBS | {
    "representing", "reflecting", "suggesting", "indicating", "due", "secondary", "which", "that",
    "likely", "probably", "possibly", "consistent", "compatible",
}
#: At most this many words between an alternative and "versus" ("effusion on the left versus").
MAX_VERSUS_GAP = 4
#: A piece longer than this many words without a closing conjunction is a new statement: list
#: members in reports are short noun phrases ("large right pleural effusion").
MAX_MEMBER_WORDS = 6
#: A cue among a piece's first this many words opens a new statement ("..., possible effusion");
#: one further on stays inside the list ("..., or consolidation to suggest pneumonia").
HEAD_WORDS = 2

_WORD = re.compile(r"[a-z][a-z/'-]*")
_NONBLANK = re.compile(r"\S+")


def _words(low: str, start: int, end: int) -> list[str]:
    return _WORD.findall(low, start, end)


def closes_list(low: str, start: int, end: int) -> bool:
    """Does "or" / "nor" join list members anywhere in ``low[start:end]``?"""
    return any(w in CLOSING for w in _words(low, start, end))


def is_member(words: Sequence[str], *, opens_with_cue: bool, closed: bool) -> bool:
    """Is a comma piece (its words) a further member of the list the cue governs?"""
    if not words:
        return True
    if words[0] in CLOSING:
        return True
    if opens_with_cue:
        return False
    body = list(words[1:]) if words[0] in JOINING else list(words)
    verb = next((i for i, w in enumerate(body) if w in CLAUSE_VERBS), None)
    if verb is not None:
        # a verb after the list's closing "or" ends the list, not this member ("..., pneumothorax
        # or effusion identified"); a verb before it makes the piece a clause of its own
        return any(w in CLOSING for w in body[:verb])
    if closed:
        return True
    if len(body) > MAX_MEMBER_WORDS:
        return False
    return not (body and body[0] in ASSERTIVE)


def forward_end(low: str, start: int, limit: int, cue_starts: Sequence[int]) -> int:
    """Where a forward cue's scope ends: the first comma (from ``start``, up to ``limit``) whose
    following piece is not a list member. ``cue_starts`` (sorted) are the offsets of other cues
    in the sentence: a cue among the first :data:`HEAD_WORDS` words of a piece opens a new
    statement.
    """
    closed = closes_list(low, start, limit)
    pos = low.find(",", start, limit)
    while pos != -1:
        nxt = low.find(",", pos + 1, limit)
        piece_end = limit if nxt == -1 else nxt
        words = _words(low, pos + 1, piece_end)
        head = _head_end(low, pos + 1, piece_end)
        i = bisect_left(cue_starts, pos + 1)
        opens_with_cue = i < len(cue_starts) and cue_starts[i] < head
        if not is_member(words, opens_with_cue=opens_with_cue, closed=closed):
            return pos
        pos = nxt
    return limit


def backward_start(low: str, lo: int, cue_start: int) -> int:
    """Where a backward cue's scope starts, at or after ``lo`` (its clause start): the cue's own
    comma piece, extended over the list it closes when that piece starts with a conjunction."""
    commas = [i for i in range(lo, cue_start) if low[i] == ","]
    if not commas:
        return lo
    own = _words(low, commas[-1] + 1, cue_start)
    if own in ([], ["which"], ["that"]):
        # "nodule, likely a nipple shadow" / ", which may be": the piece before is the subject
        return commas[-2] + 1 if len(commas) > 1 else lo
    if not any(w in JOINING for w in own):
        return commas[-1] + 1  # "consolidation, pneumothorax is not seen": not a list's end
    closed = any(w in CLOSING for w in own)
    # piece k runs from bounds[k] to commas[k]; the first piece that is no further member is
    # where the list starts (a list's first member may carry anything: "small effusion, ...")
    bounds = [lo, *(c + 1 for c in commas)]
    for k in range(len(commas) - 1, 0, -1):
        if not is_member(_words(low, bounds[k], commas[k]), opens_with_cue=False, closed=closed):
            return bounds[k]
    return lo


def versus_reaches(low: str, mention_end: int, versus_start: int) -> bool:
    """Is the finding ending at ``mention_end`` the left alternative of the "versus" at
    ``versus_start``? Only when a short gap with no verb or explanation lies between them."""
    gap = _words(low, mention_end, versus_start)
    return len(gap) <= MAX_VERSUS_GAP and not any(w in PHRASE_BREAKERS for w in gap)


def _head_end(low: str, start: int, end: int) -> int:
    """The offset just after the first :data:`HEAD_WORDS` words of ``low[start:end]`` (``end``
    when it has fewer)."""
    for found, m in enumerate(_NONBLANK.finditer(low, start, end), 1):
        if found == HEAD_WORDS:
            return m.end()
    return end
