"""Tolerant extraction of findings from model text; strict, validated objects out.

Models print JSON inside prose, fences, reasoning traces and truncated generations. This module
salvages what it can and hands on only validated :class:`~cxr_auditor.schema.ImageFinding` and
:class:`~cxr_auditor.schema.DraftFinding` objects. Whatever it drops is recorded as a reason code
(``"box_dropped:out_of_range"``), never as model free text (CONTRACT.md "Grounding output",
"Draft parsing"; reference-notes.md §4 describes the reference behaviour we improve on).

Nothing here raises anything but :class:`~cxr_auditor.errors.ParseError`, and
:func:`strip_reasoning` never raises at all.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from cxr_auditor.errors import ParseError
from cxr_auditor.labels import Label, normalize_label
from cxr_auditor.schema import (
    Box,
    DraftFinding,
    DraftStatus,
    GroundingResult,
    GroundingState,
    ImageFinding,
    Laterality,
)

__all__ = [
    "LOC_TOKEN_RE",
    "MAX_ELEMENTS",
    "RAW_TEXT_LIMIT",
    "coerce_box",
    "extract_finding_list",
    "failed_grounding",
    "loc_tokens_to_boxes",
    "parse_draft_output",
    "parse_grounding_output",
    "salvage_finding_list",
    "span_laterality",
    "strip_reasoning",
]

#: Cap on elements taken from one model answer; a degenerate generation repeats one element
#: until the token limit, and nothing clinically meaningful needs more.
MAX_ELEMENTS = 64

#: Raw model text kept on a failed result is cut to this many characters.
RAW_TEXT_LIMIT = 4000

# Longest raw label kept in ``unmapped``: enough for any real label, short enough that a model
# echoing a whole paragraph into "label" cannot bloat the result.
_MAX_UNMAPPED_CHARS = 80

# ---------------------------------------------------------------------------------------------
# Reasoning blocks
# ---------------------------------------------------------------------------------------------

_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN_RE = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"</think>", re.IGNORECASE)
# An answer that resumes inside an unclosed reasoning block: a paragraph (after a blank line)
# whose first character opens JSON or a code fence.
_ANSWER_AFTER_BLANK_RE = re.compile(r"\n[ \t]*\n[ \t]*(?=\[|\{|```)")


def strip_reasoning(text: str) -> str:
    """Remove reasoning traces (``<think>…</think>``) and return the answer part, trimmed.

    Three shapes are handled, in this order:

    1. Complete ``<think>…</think>`` blocks (any case, across lines) are deleted.
    2. A lone ``</think>`` left over means the opening tag was swallowed (a chat template that
       puts ``<think>`` in the prompt, or ``skip_special_tokens``): everything up to and
       including the last ``</think>`` is reasoning and is dropped.
    3. An unclosed ``<think>`` means the trace was cut off (token limit) or the model never
       closed it. Text before the tag is kept. Inside the block, the answer is taken to start
       at the *last* paragraph that begins with ``[``, ``{`` or a code fence after a blank line,
       because a model that forgot the closing tag still separates its answer by a blank line,
       while reasoning mentioning brackets mid-sentence does not start a paragraph with them.
       Without such a paragraph the rest of the text is reasoning and is dropped, so brackets
       in a truncated trace can never be mistaken for the answer.

    Never raises.
    """
    out = _THINK_BLOCK_RE.sub("", text)
    closes = list(_THINK_CLOSE_RE.finditer(out))
    if closes:
        out = out[closes[-1].end() :]
    opening = _THINK_OPEN_RE.search(out)
    if opening:
        before, inside = out[: opening.start()], out[opening.end() :]
        answers = list(_ANSWER_AFTER_BLANK_RE.finditer(inside))
        out = before + (inside[answers[-1].end() :] if answers else "")
    return out.strip()


# ---------------------------------------------------------------------------------------------
# JSON scanning
# ---------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_CLOSER = {"[": "]", "{": "}"}


def _strip_fence(text: str) -> str:
    """Return the body of the first code fence (closed or cut off), or the text unchanged."""
    match = _FENCE_RE.search(text)
    return match.group(1) if match else text


class _Brackets:
    """Where each ``[`` / ``{`` of a text is balanced, computed lazily and shared.

    :meth:`end` gives the index just past the bracket that balances ``text[start]``, or None
    when it never closes or a mismatched bracket comes first. Brackets inside JSON strings do
    not count and backslash escapes are honoured, so ``"a ] \\" ["`` inside a value cannot end
    the scan early. One scan records the answer for every bracket it passes (a bracket nested
    outside strings sees exactly the same characters from its own start), which keeps degenerate
    output such as thousands of ``{`` linear instead of quadratic.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._ends: dict[int, int | None] = {}

    def end(self, start: int) -> int | None:
        if start not in self._ends:
            self._scan(start)
        return self._ends[start]

    def _scan(self, start: int) -> None:
        text = self.text
        stack: list[int] = []
        in_string = False
        escaped = False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in _CLOSER:
                stack.append(i)
            elif ch in "]}":
                if _CLOSER[text[stack[-1]]] != ch:
                    break
                self._ends[stack.pop()] = i + 1
                if not stack:
                    return
        for opened in stack:
            self._ends[opened] = None


def _loads(fragment: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(fragment)
    except (ValueError, RecursionError):
        return False, None


def _salvage_from(brackets: _Brackets, start: int) -> list[dict[str, Any]]:
    """Complete leading objects of the array whose ``[`` is at ``start`` (at most MAX_ELEMENTS).

    Between elements only whitespace and one comma may appear; a ``]``, prose, a non-object or
    an element that is unbalanced or invalid JSON ends the salvage.
    """
    text = brackets.text
    out: list[dict[str, Any]] = []
    pos = start + 1
    n = len(text)
    while len(out) < MAX_ELEMENTS:
        while pos < n and text[pos].isspace():
            pos += 1
        if out and pos < n and text[pos] == ",":
            pos += 1
            while pos < n and text[pos].isspace():
                pos += 1
        if pos >= n or text[pos] != "{":
            break
        end = brackets.end(pos)
        if end is None:
            break
        ok, value = _loads(text[pos:end])
        if not ok or not isinstance(value, dict):
            break
        out.append(value)
        pos = end
    return out


def salvage_finding_list(text: str) -> list[dict[str, Any]]:
    """Recover the complete leading objects of a (possibly truncated) JSON array.

    Reasoning and code fences are stripped first; the array is the first ``[`` of what is left.
    Returns an empty list when nothing complete precedes the cut; never invents an element
    (each one is ``json.loads`` of a balanced substring of the text).
    """
    body = _strip_fence(strip_reasoning(text))
    start = body.find("[")
    return [] if start < 0 else _salvage_from(_Brackets(body), start)


def _is_object_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _unwrap(obj: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``{"findings": [...]}`` -> the list, when exactly one key holds a non-empty object list.

    An empty list under a single key (``{"findings": []}``) also unwraps: the model said
    "nothing", which is an answer, not a parse failure.
    """
    if "label" in obj:
        return None
    lists = [v for v in obj.values() if isinstance(v, list) and v and _is_object_list(v)]
    if len(lists) == 1:
        return lists[0]
    if len(obj) == 1:
        (only,) = obj.values()
        if only == []:
            return []
    return None


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop exact repeats (degenerate generation), keep first occurrence, cap the count."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for item in items:
        key = json.dumps(item, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(item)
            if len(out) >= MAX_ELEMENTS:
                break
    return out


def _find_list(body: str) -> tuple[list[dict[str, Any]] | None, str]:
    """The finding list in ``body`` (see :func:`extract_finding_list`), or None and why not."""
    brackets = _Brackets(body)
    fallback: dict[str, Any] | None = None
    reason = "no JSON array or object found"
    pos = 0
    while True:
        starts = [i for i in (body.find("[", pos), body.find("{", pos)) if i >= 0]
        if not starts:
            break
        start = min(starts)
        end = brackets.end(start)
        if body[start] == "[":
            if end is None:
                salvaged = _salvage_from(brackets, start)
                if salvaged:
                    return _dedupe(salvaged), ""
                reason = "array is not balanced and no complete element precedes the cut"
                break
            ok, value = _loads(body[start:end])
            if ok and _is_object_list(value):
                return _dedupe(value), ""
            if ok:
                reason = "array elements are not objects"
            else:
                salvaged = _salvage_from(brackets, start)
                if salvaged:
                    return _dedupe(salvaged), ""
                reason = "array is invalid JSON"
            pos = end
            continue
        if end is None:
            # A truncated object may still hold a salvageable array (a cut-off wrapper).
            pos = start + 1
            reason = "object is not balanced"
            continue
        ok, value = _loads(body[start:end])
        if ok and isinstance(value, dict):
            unwrapped = _unwrap(value)
            if unwrapped is not None:
                return _dedupe(unwrapped), ""
            if "label" in value:
                return [value], ""
            if fallback is None:
                fallback = value
        elif not ok:
            reason = "object is invalid JSON"
        pos = end
    return ([fallback], "") if fallback is not None else (None, reason)


def extract_finding_list(text: str) -> list[dict[str, Any]]:
    """Extract the list of finding objects a model printed.

    Reasoning is stripped first (:func:`strip_reasoning`). The body of the first code fence is
    searched before the whole text (a fence may also hold a note after the answer). Each ``[``
    / ``{`` is then tried in order:

    - a balanced array that is valid JSON and holds only objects is the answer (``[]`` too);
      one holding non-objects (``[1, 2]``, a box) is skipped;
    - a balanced array that is invalid JSON yields its complete leading elements (salvage); if
      none, it is skipped (it was prose such as ``[draft]``);
    - an array that never closes (truncated) yields its complete leading elements or, if none,
      ends the search: nothing after an unclosed bracket can be trusted;
    - an object: a wrapper (one key holding a list of objects) is unwrapped; an object with a
      ``label`` is a one-element answer; any other object is kept only as a last resort.

    Exact repeated elements are collapsed and at most :data:`MAX_ELEMENTS` are returned.

    Raises:
        ParseError: nothing usable was found; ``raw_text`` is the input.
    """
    answer = strip_reasoning(text)
    fenced = _strip_fence(answer)
    found, reason = _find_list(fenced)
    if found is None and fenced != answer:
        found, _ = _find_list(answer)
    if found is None:
        raise ParseError(f"no finding list in model output: {reason}", raw_text=text)
    return found


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------

#: One PaliGemma location token; four in a row are a box ``y0 x0 y1 x1`` in 1024 bins.
LOC_TOKEN_RE = re.compile(r"<loc(\d{4})>")
_LOC_BOX_RE = re.compile(r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>")
_LOC_BINS = 1024


def _as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _ordered_box(y0: float, x0: float, y1: float, x1: float) -> tuple[Box | None, bool]:
    """Build a Box from corners in any order; (None, _) for zero area. Second item: reordered."""
    reordered = y0 > y1 or x0 > x1
    ya, yb = sorted((y0, y1))
    xa, xb = sorted((x0, x1))
    if yb <= ya or xb <= xa:
        return None, reordered
    return Box(y0=ya, x0=xa, y1=yb, x1=xb), reordered


def coerce_box(value: object) -> tuple[Box | None, str | None]:
    """Turn a model's ``box_2d`` into a normalised :class:`Box`, or say why not.

    Returns ``(box, note)``. ``None`` input (not localisable) gives ``(None, None)``. Scale:
    all components in [0, 1] are normalised; otherwise, all in [0, 1000] are the 0–1000
    convention and are divided by 1000 (note ``box_rescaled:0_1000``). Inverted corners are
    reordered (note ``box_reordered``; both together: ``box_rescaled:0_1000+box_reordered``).
    Failures return ``(None, "box_dropped:<reason>")`` with reason ``not_a_list``,
    ``wrong_length``, ``non_numeric``, ``out_of_range`` or ``zero_area``.
    """
    if value is None:
        return None, None
    if not isinstance(value, list | tuple):
        return None, "box_dropped:not_a_list"
    if len(value) != 4:
        return None, "box_dropped:wrong_length"
    numbers = [_as_number(v) for v in value]
    if any(n is None for n in numbers):
        return None, "box_dropped:non_numeric"
    comps = [float(n) for n in numbers if n is not None]
    if min(comps) < 0.0 or max(comps) > 1000.0:
        return None, "box_dropped:out_of_range"
    notes = []
    if max(comps) > 1.0:
        comps = [c / 1000.0 for c in comps]
        notes.append("box_rescaled:0_1000")
    box, reordered = _ordered_box(*comps)
    if box is None:
        return None, "box_dropped:zero_area"
    if reordered:
        notes.append("box_reordered")
    return box, "+".join(notes) or None


def loc_tokens_to_boxes(text: str) -> list[tuple[Box, int, int]]:
    """Boxes written as PaliGemma ``<locNNNN>`` tokens: four per box, ``y0 x0 y1 x1``.

    Each token is a bin in 0–1023 and maps to ``value / 1024``. Returns each usable box with the
    ``(start, end)`` offsets of its four tokens in ``text``; groups with a bin above 1023 or
    zero area are skipped. Inverted corners are reordered.
    """
    out: list[tuple[Box, int, int]] = []
    for match in _LOC_BOX_RE.finditer(text):
        bins = [int(g) for g in match.groups()]
        if max(bins) >= _LOC_BINS:
            continue
        box, _ = _ordered_box(*(b / _LOC_BINS for b in bins))
        if box is not None:
            out.append((box, match.start(), match.end()))
    return out


# ---------------------------------------------------------------------------------------------
# Grounding output
# ---------------------------------------------------------------------------------------------


def _confidence(value: object) -> float | None:
    number = _as_number(value) if not isinstance(value, str) else None
    return number if number is not None and 0.0 <= number <= 1.0 else None


def parse_grounding_output(text: str, *, image_index: int = 0) -> GroundingResult:
    """Parse one grounding answer (a JSON list of ``{label, box_2d}``) for one image.

    State ``ok`` when at least one canonical finding remains, ``inconclusive`` when the JSON is
    valid but holds none (``[]``, only unmapped labels). Labels go through
    :func:`~cxr_auditor.labels.normalize_label`; unmapped ones are kept in ``unmapped`` (raw,
    trimmed). Boxes go through :func:`coerce_box` (a bad box drops the box, never the finding).
    ``no_finding`` next to positives is dropped with a note. Exact ``(label, box)`` repeats are
    collapsed, first wins. ``confidence`` is kept only as a number in [0, 1], ``evidence`` only
    as a string.

    Raises:
        ParseError: nothing parseable (the retry ladder decides what happens next).
    """
    items = extract_finding_list(text)
    notes: list[str] = []
    unmapped: list[str] = []
    findings: list[ImageFinding] = []
    seen: set[tuple[Label, tuple[float, ...] | None]] = set()
    for item in items:
        raw_label = item.get("label")
        label = normalize_label(raw_label)
        if label is None:
            if isinstance(raw_label, str) and raw_label.strip():
                raw = raw_label.strip()[:_MAX_UNMAPPED_CHARS]
                if raw not in unmapped:
                    unmapped.append(raw)
            else:
                notes.append("finding_dropped:label_not_text")
            continue
        box, box_note = coerce_box(item.get("box_2d", item.get("box")))
        if box_note:
            notes.append(box_note)
        key = (label, tuple(box.as_list()) if box else None)
        if key in seen:
            notes.append("duplicate_collapsed")
            continue
        seen.add(key)
        confidence = _confidence(item.get("confidence"))
        if confidence is None and item.get("confidence") is not None:
            notes.append("confidence_dropped:invalid")
        evidence = item.get("evidence")
        findings.append(
            ImageFinding(
                label=label,
                image_index=image_index,
                box=box,
                confidence=confidence,
                evidence=evidence if isinstance(evidence, str) else None,
            )
        )
    if any(f.label is Label.NO_FINDING for f in findings) and any(
        f.label is not Label.NO_FINDING for f in findings
    ):
        findings = [f for f in findings if f.label is not Label.NO_FINDING]
        notes.append("no_finding_with_positives:positives_kept")
    if not findings:
        notes.append("no_usable_finding" if items or unmapped else "empty_list")
        return GroundingResult(state=GroundingState.INCONCLUSIVE, unmapped=unmapped, notes=notes)
    return GroundingResult(
        state=GroundingState.OK, findings=findings, unmapped=unmapped, notes=notes
    )


def failed_grounding(error: ParseError, attempts: int) -> GroundingResult:
    """The ``failed`` result of an image whose answer never parsed on any rung of the ladder.

    Keeps the last raw model text (cut to :data:`RAW_TEXT_LIMIT`) for inspection; the note is
    the reason code ``unparseable_after_retries``.
    """
    return GroundingResult(
        state=GroundingState.FAILED,
        notes=["unparseable_after_retries"],
        raw_text=error.raw_text[:RAW_TEXT_LIMIT],
        attempts=attempts,
    )


# ---------------------------------------------------------------------------------------------
# Draft output (model-backed draft parsers)
# ---------------------------------------------------------------------------------------------

_STATUS_WORDS: dict[str, DraftStatus] = {
    **dict.fromkeys(("present", "positive", "yes", "true"), DraftStatus.PRESENT),
    **dict.fromkeys(("absent", "negative", "denied", "no", "none", "false"), DraftStatus.ABSENT),
    **dict.fromkeys(
        ("uncertain", "possible", "probable", "hedged", "questionable", "equivocal"),
        DraftStatus.UNCERTAIN,
    ),
}

_LEFT_RE = re.compile(r"\bleft\b", re.IGNORECASE)
_RIGHT_RE = re.compile(r"\bright\b", re.IGNORECASE)
_BILATERAL_RE = re.compile(r"\b(?:bilateral(?:ly)?|both)\b", re.IGNORECASE)


def _coerce_status(value: object) -> DraftStatus | None:
    """Map a model's status onto a DraftStatus; None for anything unrecognised.

    A missing status means the model listed the label as stated, so it reads as present. An
    unknown word is never guessed into ``present``: that is how the reference turned denials
    into claims (reference-notes §9.1 item 5).
    """
    if value is None:
        return DraftStatus.PRESENT
    if isinstance(value, bool):
        return DraftStatus.PRESENT if value else DraftStatus.ABSENT
    if isinstance(value, str):
        return _STATUS_WORDS.get(value.strip().lower())
    return None


def span_laterality(span: str) -> Laterality | None:
    """Patient side a span states: ``bilateral``/``both`` or left and right together give
    bilateral; ``left`` or ``right`` alone give that side; otherwise None."""
    left, right = bool(_LEFT_RE.search(span)), bool(_RIGHT_RE.search(span))
    if _BILATERAL_RE.search(span) or (left and right):
        return Laterality.BILATERAL
    if left:
        return Laterality.LEFT
    if right:
        return Laterality.RIGHT
    return None


def _anchor_span(span: str, draft: str) -> tuple[int, int] | None:
    """Where ``span`` occurs in ``draft``: exact, then case-insensitive, then with any run of
    whitespace matching any other (models re-flow line breaks). Returns (start, end) or None."""
    needle = span.strip()
    if not needle:
        return None
    idx = draft.find(needle)
    if idx >= 0:
        return idx, idx + len(needle)
    idx = draft.lower().find(needle.lower())
    # lower() can change length for a few non-ASCII letters; only trust a same-length hit.
    if idx >= 0 and len(draft.lower()) == len(draft) and len(needle.lower()) == len(needle):
        return idx, idx + len(needle)
    pattern = r"\s+".join(re.escape(word) for word in needle.split())
    match = re.search(pattern, draft, re.IGNORECASE)
    return (match.start(), match.end()) if match else None


def parse_draft_output(text: str, draft_text: str) -> tuple[list[DraftFinding], list[str]]:
    """Parse a model-backed draft parser's answer (JSON list of ``{label, status, span}``).

    Status words: present/positive/yes/true/null -> present; absent/negative/denied/no/none/
    false -> absent; uncertain/possible/probable/hedged/questionable/equivocal -> uncertain.
    Anything else drops the element (``status_unknown``). Spans are re-anchored on
    ``draft_text`` (:func:`_anchor_span`); a span that is missing or not in the draft drops the
    element (``span_missing`` / ``span_not_in_draft``), because the contract promises verbatim
    spans. Labels outside the label space are dropped (``label_unmapped``). Repeats of
    ``(label, status)`` are collapsed, first wins; the same label with two statuses is kept
    twice (the comparator resolves it). Laterality comes from the anchored span.

    Returns ``(findings, notes)``.

    Raises:
        ParseError: nothing parseable.
    """
    items = extract_finding_list(text)
    notes: list[str] = []
    findings: list[DraftFinding] = []
    seen: set[tuple[Label, DraftStatus]] = set()
    for item in items:
        label = normalize_label(item.get("label"))
        if label is None:
            notes.append("finding_dropped:label_unmapped")
            continue
        status = _coerce_status(item.get("status"))
        if status is None:
            notes.append("finding_dropped:status_unknown")
            continue
        raw_span = item.get("span")
        if not isinstance(raw_span, str) or not raw_span.strip():
            notes.append("finding_dropped:span_missing")
            continue
        where = _anchor_span(raw_span, draft_text)
        if where is None:
            notes.append("finding_dropped:span_not_in_draft")
            continue
        if (label, status) in seen:
            notes.append("duplicate_collapsed")
            continue
        seen.add((label, status))
        start, end = where
        span = draft_text[start:end]
        findings.append(
            DraftFinding(
                label=label,
                status=status,
                span=span,
                start=start,
                end=end,
                laterality=span_laterality(span),
            )
        )
    return findings, notes
