"""The lexicon's alternations: the first-letter grouping finds what a plain alternation finds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cxr_auditor.drafts import _lexicon as lx

DATA = Path(__file__).resolve().parents[2] / "data"


def _texts() -> list[str]:
    with (DATA / "drafts_holdout2.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line)["text"].lower() for line in fh if line.strip()]


@pytest.mark.parametrize(
    ("alternation", "words", "punct", "tail"),
    [
        (lx.PHRASE_ALT, [e.pattern for e in lx.PHRASES], [], ""),
        (lx.TERM_ALT, [e.pattern for e in lx.TERMS], [], r"\b"),
        (lx.TRIGGER_ALT, [lx.rx(p) for p, _ in lx.TRIGGERS], [p for p, _ in lx.PUNCT_TRIGGERS], ""),
    ],
    ids=["phrases", "terms", "triggers"],
)
def test_grouped_scan_finds_the_plain_alternations_hits(
    alternation: lx.Alternation, words: list[str], punct: list[str], tail: str
) -> None:
    plain = re.compile("|".join([r"(?<!\w)(?=[a-z])(?:" + "|".join(words) + ")" + tail, *punct]))
    parts = [re.compile(f"(?:{w}){tail}") for w in words] + [re.compile(p) for p in punct]
    hits = 0
    for text in _texts():
        expected = [
            (next(i for i, p in enumerate(parts) if p.match(text, m.start())), m.start(), m.end())
            for m in plain.finditer(text)
        ]
        assert list(alternation.finditer(text, 0, len(text))) == expected
        hits += len(expected)
    assert hits > 100  # the reports exercise the alternation


def test_first_chars_of_a_pattern() -> None:
    assert lx._first_chars(r"(?:no|not) effusion") == frozenset("n")
    assert lx._first_chars(r"(?:large )?effusion") == frozenset("le")
    assert lx._first_chars(r"\w+") is None  # a class: any start
    assert lx._first_chars(r"(?:a)?") is None  # can match nothing
