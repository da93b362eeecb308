"""Counts, rates and their confidence intervals for the evaluation and monitoring figures.

A rate computed from few cases says little: 3 of 3 is "100 %" but is compatible with 44 %.
Every rate here therefore comes with a Wilson score interval (Wilson 1927, "Probable inference,
the law of succession, and statistical inference", JASA 22:209), which unlike the normal
approximation stays inside [0, 1] and is sensible for 0 or n successes. A rate with no cases at
all is ``None`` (undefined), never 0 or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Z_95", "BinaryCounts", "Rate", "wilson_interval"]

#: Two-sided 95 % normal quantile.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of ``successes`` out of ``n``; None when ``n`` is 0.

    Raises:
        ValueError: ``successes`` outside ``[0, n]``.
    """
    if not 0 <= successes <= n:
        raise ValueError("successes must lie between 0 and n")
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """``successes / n`` with its 95 % Wilson interval; ``value`` None when ``n`` is 0."""

    successes: int
    n: int

    @property
    def value(self) -> float | None:
        return self.successes / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.successes, self.n)

    def as_dict(self) -> dict[str, Any]:
        ci = self.interval
        return {
            "value": None if self.value is None else round(self.value, 4),
            "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
            "successes": self.successes,
            "n": self.n,
        }

    def text(self, small: int = 100) -> str:
        """``0.750`` or, when ``n`` is under ``small``, ``0.750 [0.30-0.95] n=4``; ``-`` if undefined."""
        if self.value is None:
            return "-"
        if self.n >= small:
            return f"{self.value:.3f}"
        lo, hi = self.interval or (0.0, 1.0)
        return f"{self.value:.3f} [{lo:.2f}-{hi:.2f}] n={self.n}"


@dataclass
class BinaryCounts:
    """Confusion counts of one binary decision (a label present or not, a flag right or not)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, truth: bool, predicted: bool) -> None:
        if truth and predicted:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif truth:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> Rate:
        return Rate(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> Rate:
        """Recall, i.e. sensitivity."""
        return Rate(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Rate:
        return Rate(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float | None:
        """Harmonic mean of precision and recall; None when neither truth nor prediction has
        a positive (nothing to score), 0 when there are positives but no true positive."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": self.precision.as_dict(),
            "recall": self.recall.as_dict(),
            "specificity": self.specificity.as_dict(),
            "f1": None if self.f1 is None else round(self.f1, 4),
        }
