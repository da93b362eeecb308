"""Throughput of the rule-based draft parser on one CPU core, beside the NegEx baseline.

Parses every report of the in-house sets (or of ``--reports FILE``, JSON Lines with a "text"
field, such as a real report set kept outside the repository) repeatedly for at least
``--seconds`` with each parser in turn, and prints reports per second, per-report latency
percentiles and the ratio to the baseline measured in the same run. The process pins itself to
one core where the OS allows it, so the figure is a single-core one. Tests never assert it.

The rules parser caches the reading of each sentence (report sets repeat template sentences).
Every round starts with an empty cache, so a figure is that of one cold pass over the set; the
"no reuse" line empties it before every report, which is the speed on a set whose reports share
no sentence.

    .venv/bin/python benchmarks/draft_parser.py [--seconds 5] [--reports FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.drafts.negex import NegExDraftParser
from cxr_auditor.drafts.rules import (
    RulesDraftParser,
    clear_sentence_cache,
    sentence_cache_hit_rate,
)

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SETS = (
    "drafts_dev.jsonl",
    "drafts_holdout.jsonl",
    "drafts_holdout2.jsonl",
    "drafts_holdout3.jsonl",
    "drafts_holdout4.jsonl",
    "drafts_holdout5.jsonl",
    "drafts_holdout6.jsonl",
    "drafts_holdout7.jsonl",
    "drafts_holdout8.jsonl",
)


def load_texts(paths: list[Path]) -> list[str]:
    texts: list[str] = []
    for path in paths:
        with path.open(encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum measuring time")
    ap.add_argument("--reports", type=Path, action="append",
                    help="JSONL report file(s) to parse instead of the in-house sets")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    texts = load_texts(args.reports or [DATA / name for name in SETS])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, pinned to one core, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, subset in (
        ("all reports", texts),
        (f"full reports (>= {LONG} chars)", [t for t in texts if len(t) >= LONG]),
    ):
        print(f"{name}: {len(subset)} distinct, mean {statistics.mean(map(len, subset)):.0f} chars")
        clear_sentence_cache()
        parser = RulesDraftParser()
        for text in subset:
            parser.parse(text)
        print(f"  one cold pass: {sentence_cache_hit_rate():.0%} of sentence readings came from"
              " the cache (sentences the set repeats)")
        rules = measure(parser, subset, args.seconds, clear_per_round=True)
        measure(RulesDraftParser(), subset, args.seconds, clear_per_report=True)
        baseline = measure(NegExDraftParser(), subset, args.seconds)
        print(f"  rules / negex throughput (CPU time, one cold pass): {rules / baseline:.2f}")


LONG = 250


def measure(
    parser: DraftParser, texts: list[str], seconds: float, *,
    clear_per_round: bool = False, clear_per_report: bool = False,
) -> float:
    """Parse ``texts`` round after round for ``seconds``; print wall and CPU throughput and
    return the reports per second of CPU time. The sentence cache is emptied at the start of
    every round, or before every report."""
    for text in texts:  # warm the regex caches
        parser.parse(text)
    latencies: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        if clear_per_round or clear_per_report:
            clear_sentence_cache()
        for text in texts:
            if clear_per_report:
                clear_sentence_cache()
            t0 = time.perf_counter()
            parser.parse(text)
            latencies.append(time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    q = statistics.quantiles(latencies, n=100)
    label = f"{parser.name}, no reuse" if clear_per_report else parser.name
    print(f"  {label}: {len(latencies)} parsed: {len(latencies) / wall:,.0f} reports/s wall, "
          f"{len(latencies) / cpu:,.0f} reports/s of CPU time; "
          f"latency p50 {q[49] * 1e6:.0f} us, p99 {q[98] * 1e6:.0f} us")
    return len(latencies) / cpu


if __name__ == "__main__":
    main()
