"""The retry ladder: greedy, greedy with a corrective suffix, then low-temperature sampling.

A model answer that cannot be parsed is not a backend failure: the same prompt is asked again
with a firmer instruction, and if greedy decoding keeps producing the same broken text, a little
sampling breaks the loop (CONTRACT.md "Grounding output"; reference-notes §6.4). Backends call
:func:`run_with_retry` for one request or :func:`run_batch_with_retry` for a batch, where only
the items that failed are generated again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cxr_auditor.errors import ParseError

__all__ = [
    "SAMPLING_TEMPERATURE",
    "SAMPLING_TOP_P",
    "AttemptSettings",
    "attempt_settings",
    "batched",
    "run_batch_with_retry",
    "run_with_retry",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Sampling settings of the third and later rungs: low enough to stay on task, high enough to
#: leave a greedy loop.
SAMPLING_TEMPERATURE = 0.4
SAMPLING_TOP_P = 0.9


@dataclass(frozen=True)
class AttemptSettings:
    """How to generate on one attempt. ``temperature``/``top_p`` are None when greedy."""

    attempt: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    corrective_suffix: bool


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size`` (a profile's generation batch)."""
    for first in range(0, len(items), size):
        yield items[first : first + size]


def attempt_settings(attempt: int) -> AttemptSettings:
    """Settings of rung ``attempt`` (1-based): 1 greedy; 2 greedy + corrective suffix;
    3 and later sampling (T=0.4, top_p=0.9) + corrective suffix."""
    if attempt < 1:
        raise ValueError("attempt must be >= 1")
    if attempt == 1:
        return AttemptSettings(attempt, False, None, None, False)
    if attempt == 2:
        return AttemptSettings(attempt, False, None, None, True)
    return AttemptSettings(attempt, True, SAMPLING_TEMPERATURE, SAMPLING_TOP_P, True)


def _check_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")


def _with_raw(exc: ParseError, raw: str) -> ParseError:
    # A parser that forgot raw_text still gives the caller what the model said.
    if not exc.raw_text:
        exc.raw_text = raw
    return exc


def run_with_retry(
    generate: Callable[[AttemptSettings], str],
    parse: Callable[[str], T],
    max_attempts: int,
) -> tuple[T, int]:
    """Generate and parse until a parse succeeds or ``max_attempts`` are used.

    Returns ``(parsed, attempts_used)``. Only :class:`ParseError` triggers another attempt;
    anything else ``generate`` or ``parse`` raises (a :class:`~cxr_auditor.errors.BackendError`)
    propagates at once.

    Raises:
        ParseError: the last attempt's error, with ``raw_text`` set to that attempt's output.
        ValueError: ``max_attempts`` < 1.
    """
    _check_attempts(max_attempts)
    last: ParseError | None = None
    for attempt in range(1, max_attempts + 1):
        raw = generate(attempt_settings(attempt))
        try:
            return parse(raw), attempt
        except ParseError as exc:
            last = _with_raw(exc, raw)
            logger.debug("parse failed on attempt %d of %d", attempt, max_attempts)
    assert last is not None  # the loop ran at least once
    raise last


def run_batch_with_retry(
    generate_batch: Callable[[list[int], AttemptSettings], list[str]],
    parse: Callable[[int, str], T],
    n: int,
    max_attempts: int,
) -> list[tuple[T | ParseError, int, str]]:
    """The ladder for a batch of ``n`` requests: each rung regenerates only the failed items.

    ``generate_batch(indices, settings)`` returns one text per index, in order; ``parse(index,
    text)`` parses one. Returns, per item in input order, ``(parsed or last ParseError,
    attempts used, last raw text)``; a ParseError here is a value, not raised.

    Raises:
        ValueError: ``max_attempts`` < 1, or ``generate_batch`` returned the wrong count.
    """
    _check_attempts(max_attempts)
    results: dict[int, tuple[T | ParseError, int, str]] = {}
    pending = list(range(n))
    for attempt in range(1, max_attempts + 1):
        if not pending:
            break
        texts = generate_batch(pending, attempt_settings(attempt))
        if len(texts) != len(pending):
            raise ValueError(
                f"generate_batch returned {len(texts)} texts for {len(pending)} requests"
            )
        failed: list[int] = []
        for index, raw in zip(pending, texts, strict=True):
            try:
                results[index] = (parse(index, raw), attempt, raw)
            except ParseError as exc:
                results[index] = (_with_raw(exc, raw), attempt, raw)
                failed.append(index)
        if failed:
            logger.debug(
                "attempt %d of %d: %d of %d items failed to parse",
                attempt,
                max_attempts,
                len(failed),
                len(pending),
            )
        pending = failed
    return [results[i] for i in range(n)]
