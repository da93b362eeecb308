"""Tests for cxr_auditor.retry: the ladder's rungs, single and batched."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cxr_auditor.errors import BackendError, ParseError
from cxr_auditor.parsing import extract_finding_list
from cxr_auditor.retry import (
    AttemptSettings,
    attempt_settings,
    batched,
    run_batch_with_retry,
    run_with_retry,
)


def test_batched_keeps_order_and_the_short_tail() -> None:
    assert [list(b) for b in batched(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 4)) == []


class TestAttemptSettings:
    def test_rungs(self) -> None:
        assert attempt_settings(1) == AttemptSettings(1, False, None, None, False)
        assert attempt_settings(2) == AttemptSettings(2, False, None, None, True)
        assert attempt_settings(3) == AttemptSettings(3, True, 0.4, 0.9, True)
        assert attempt_settings(7) == AttemptSettings(7, True, 0.4, 0.9, True)

    def test_attempt_zero_rejected(self) -> None:
        with pytest.raises(ValueError, match="attempt"):
            attempt_settings(0)


def _scripted(answers: list[str]) -> tuple[list[AttemptSettings], Callable[[AttemptSettings], str]]:
    seen: list[AttemptSettings] = []

    def generate(s: AttemptSettings) -> str:
        seen.append(s)
        return answers[s.attempt - 1]

    return seen, generate


class TestRunWithRetry:
    def test_first_success_uses_one_attempt(self) -> None:
        seen, generate = _scripted(['[{"label": "x"}]'])
        assert run_with_retry(generate, extract_finding_list, 3) == ([{"label": "x"}], 1)
        assert [s.attempt for s in seen] == [1]

    def test_second_rung_adds_suffix_and_succeeds(self) -> None:
        seen, generate = _scripted(["nope", "[]"])
        assert run_with_retry(generate, extract_finding_list, 3) == ([], 2)
        assert [s.corrective_suffix for s in seen] == [False, True]

    def test_exhausted_raises_last_error_with_its_raw_text(self) -> None:
        seen, generate = _scripted(["first bad", "second bad", "third bad"])
        with pytest.raises(ParseError) as info:
            run_with_retry(generate, extract_finding_list, 3)
        assert info.value.raw_text == "third bad"
        assert [s.do_sample for s in seen] == [False, False, True]

    def test_raw_text_filled_when_parser_left_it_empty(self) -> None:
        def parse(text: str) -> None:
            raise ParseError("bad")

        with pytest.raises(ParseError) as info:
            run_with_retry(lambda s: f"out{s.attempt}", parse, 2)
        assert info.value.raw_text == "out2"

    def test_backend_error_propagates_without_retry(self) -> None:
        calls: list[int] = []

        def generate(s: AttemptSettings) -> str:
            calls.append(s.attempt)
            raise BackendError("server down")

        with pytest.raises(BackendError):
            run_with_retry(generate, extract_finding_list, 3)
        assert calls == [1]

    def test_max_attempts_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_attempts"):
            run_with_retry(lambda s: "[]", extract_finding_list, 0)


class TestRunBatchWithRetry:
    def test_only_failed_items_regenerated(self) -> None:
        # item 0 parses at once, item 1 on the second rung, item 2 never.
        script = {
            0: ["[]"],
            1: ["bad", '[{"label": "y"}]'],
            2: ["bad", "bad", "still bad"],
        }
        calls: list[tuple[list[int], int]] = []

        def generate_batch(indices: list[int], s: AttemptSettings) -> list[str]:
            calls.append((list(indices), s.attempt))
            return [script[i][s.attempt - 1] for i in indices]

        results = run_batch_with_retry(
            generate_batch, lambda i, text: extract_finding_list(text), 3, 3
        )
        assert calls == [([0, 1, 2], 1), ([1, 2], 2), ([2], 3)]
        assert results[0] == ([], 1, "[]")
        assert results[1] == ([{"label": "y"}], 2, '[{"label": "y"}]')
        error, attempts, raw = results[2]
        assert isinstance(error, ParseError)
        assert error.raw_text == "still bad"
        assert (attempts, raw) == (3, "still bad")

    def test_parse_receives_the_item_index(self) -> None:
        results = run_batch_with_retry(
            lambda idx, s: [str(i) for i in idx], lambda i, text: (i, text), 2, 1
        )
        assert results == [((0, "0"), 1, "0"), ((1, "1"), 1, "1")]

    def test_wrong_count_from_backend_rejected(self) -> None:
        with pytest.raises(ValueError, match="returned 1 texts for 2"):
            run_batch_with_retry(lambda idx, s: ["[]"], lambda i, t: t, 2, 2)

    def test_empty_batch_generates_nothing(self) -> None:
        def generate_batch(indices: list[int], s: AttemptSettings) -> list[str]:
            raise AssertionError("must not be called")

        assert run_batch_with_retry(generate_batch, lambda i, t: t, 0, 3) == []
