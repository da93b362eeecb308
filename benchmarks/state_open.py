"""Start-up cost of the state database's integrity check (``PRAGMA quick_check``).

Fills a state database with ``--instances`` instance rows (one study per 2 instances, bulk
insert), then times opening it with :class:`dicom_agent.state.StateDB` (pragmas, quick_check,
migrations) against the quick_check statement alone, best of ``--repeat``.

    python benchmarks/state_open.py --instances 1000000
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_agent.state import StateDB  # noqa: E402


def _fill(path: Path, instances: int) -> None:
    db = StateDB(path)
    root = "1.2.826.0.1.3680043.8.498"
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid,"
            " sop_class_uid, path, sha256, size, state, received_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                (f"{root}.{i}", f"{root}.9.{i // 2}", f"{root}.8.{i // 2}",
                 "1.2.840.10008.5.1.4.1.1.1.1", f"/spool/{root}.9.{i // 2}/{root}.{i}.dcm",
                 "0" * 64, 10_000_000, "stored", float(i), float(i))
                for i in range(instances)
            ),
        )
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "agent.sqlite3"
    _fill(path, args.instances)
    opens, checks = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        StateDB(path).close()
        opens.append(time.perf_counter() - start)
        conn = sqlite3.connect(path)
        start = time.perf_counter()
        conn.execute("PRAGMA quick_check(5)").fetchall()
        checks.append(time.perf_counter() - start)
        conn.close()
    size = path.stat().st_size / 2**20
    print(f"{args.instances} instance rows, {size:.0f} MiB: StateDB open {min(opens):.2f} s,"
          f" quick_check alone {min(checks):.2f} s (best of {args.repeat})")


if __name__ == "__main__":
    main()
