"""The disk's durable write rate, the ceiling of an ingest that acknowledges only durable data.

Two measurements on the file system of ``--dir`` (default: a temporary folder under ``var/``,
the agent's default spool location):

* ``loop``: write one ``--mb`` MB file, fsync it, rename it into place and fsync the folder,
  the way the spool stores an instance, ``--n`` times; files/s for each of ``--passes`` passes
  (on a shared VM consecutive passes differ a lot, so every pass is printed).
* ``stream``: what writing while the data arrives could save. A 128 KiB chunk "arrives" every
  ``--chunk-ms`` of CPU work (pynetdicom's receive cost per PDU); the file is written either all
  at the end then fsynced (what we do), chunk by chunk then fsynced, or chunk by chunk with
  ``posix_fadvise(DONTNEED)`` every MiB, which starts writeback early. Median ms per file.

Run: ``.venv/bin/python benchmarks/disk.py [--n 60] [--passes 2] [--mb 10]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 128 * 1024


def write_durably(folder: Path, name: str, data: bytes) -> None:
    tmp = folder / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, folder / name)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def loop(folder: Path, data: bytes, n: int) -> float:
    """Files per second of ``n`` durable writes."""
    start = time.perf_counter()
    for i in range(n):
        write_durably(folder, f"f{i}", data)
    return n / (time.perf_counter() - start)


def _receive(chunk_s: float) -> None:
    end = time.process_time() + chunk_s
    while time.process_time() < end:
        pass


def stream(folder: Path, data: bytes, chunk_s: float, mode: str, i: int) -> None:
    """One file received chunk by chunk, written in ``mode``: at_end, chunks or fadvise."""
    buf = bytearray()
    fd = os.open(folder / f"s{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        advised = 0
        for off in range(0, len(data), CHUNK):
            _receive(chunk_s)
            piece = data[off : off + CHUNK]
            if mode == "at_end":
                buf += piece
                continue
            os.write(fd, piece)
            written = off + len(piece)
            if mode == "fadvise" and written - advised >= 1 << 20:
                # On Linux DONTNEED on dirty pages starts their writeback without waiting.
                os.posix_fadvise(fd, advised, written - advised, os.POSIX_FADV_DONTNEED)
                advised = written
        if buf:
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


def median_ms(fn: Callable[[int], None], n: int) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="files per pass")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--mb", type=float, default=10.0, help="file size in MB")
    parser.add_argument("--chunk-ms", type=float, default=0.2, help="CPU ms per received chunk")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    data = os.urandom(int(args.mb * 1e6))
    root = args.dir or Path(__file__).resolve().parents[1] / "var"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="disk-bench-") as tmp:
        folder = Path(tmp)
        for p in range(args.passes):
            print(f"loop pass {p + 1}: {loop(folder, data, args.n):.1f} files/s "
                  f"({args.mb:g} MB, write + fsync + rename + folder fsync)", flush=True)
        chunk_s = args.chunk_ms / 1000
        for mode in ("at_end", "chunks", "fadvise"):
            ms = median_ms(lambda i, m=mode: stream(folder, data, chunk_s, m, i), args.n // 4)
            print(f"stream {mode:8s}: {ms:.1f} ms per file (median of {args.n // 4})", flush=True)


if __name__ == "__main__":
    main()
