"""Throughput of the rule-based draft parser on one CPU core.

Parses every report of the development and holdout sets repeatedly for at least ``--seconds``
and prints reports per second plus per-report latency percentiles. The process pins itself to
one core where the OS allows it, so the figure is a single-core one. Tests never assert it.

    .venv/bin/python benchmarks/draft_parser.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from cxr_auditor.drafts.rules import RulesDraftParser

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


def load_texts() -> list[str]:
    texts: list[str] = []
    for name in SETS:
        with (DATA / name).open(encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum measuring time")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    texts = load_texts()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, pinned to one core, "
          f"load average {os.getloadavg()[0]:.1f}")
    measure("all reports", texts, args.seconds)
    measure(f"full reports (>= {LONG} chars)", [t for t in texts if len(t) >= LONG], args.seconds)


LONG = 250


def measure(name: str, texts: list[str], seconds: float) -> None:
    """Parse ``texts`` round after round for ``seconds``; print wall and CPU throughput."""
    parser = RulesDraftParser()
    for text in texts:  # warm the regex caches
        parser.parse(text)
    latencies: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for text in texts:
            t0 = time.perf_counter()
            parser.parse(text)
            latencies.append(time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    q = statistics.quantiles(latencies, n=100)
    print(f"{name}: {len(texts)} distinct, mean {statistics.mean(map(len, texts)):.0f} chars")
    print(f"  {len(latencies)} parsed: {len(latencies) / wall:,.0f} reports/s wall, "
          f"{len(latencies) / cpu:,.0f} reports/s of CPU time")
    print(f"  latency: p50 {q[49] * 1e6:.0f} us, p99 {q[98] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
