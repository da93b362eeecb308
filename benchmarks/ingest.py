"""Ingest throughput: dcmtk ``storescu`` into our listener, dcmtk ``storescp`` and Orthanc.

Sends N synthetic ~10 MB chest radiographs (two per study) over 1 and over P parallel
associations to each receiver, all started here on loopback with fresh temporary storage and
stopped by PID. dcmtk runs with ``TCP_NODELAY=1``. Prints files/s and MB/s per receiver and the
ratio ours / storescp. Only our listener acknowledges durable data (fsync + state commit);
storescp and Orthanc (default configuration) do not fsync. The ``disk`` row is the ceiling of
any receiver that does: no network and no receiver, the same files written by 1 and P threads
the way the spool writes them (write, fsync, rename, folder fsync), in the same run.

    .venv/bin/python benchmarks/ingest.py --n 100

``--memory`` measures instead the peak RSS of our listener process (VmHWM, reset with
``/proc/<pid>/clear_refs`` after start-up) while it receives one 1 GB instance, then 16 of
100 MB over 16 parallel associations (dcmtk ``storescu`` reads them from disk as it sends):

    .venv/bin/python benchmarks/ingest.py --memory [--whole-agent]

``--idle`` measures the listener's CPU while 0, 4 and 16 associations are open and idle:

    .venv/bin/python benchmarks/ingest.py --idle

Results go to docs/benchmarks.md, "Ingest" (with the command and the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.disk import write_durably  # noqa: E402
from benchmarks.machine import cpu_model  # noqa: E402
from tests.conftest import free_port, var_paths  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
OUR_AET = "CXRAUDIT"


@dataclass(frozen=True)
class Run:
    receiver: str
    associations: int
    files: int
    total_bytes: int
    seconds: float
    received: int
    cpu_seconds: float  # the receiver's process group (storescp --fork children included)

    @property
    def cpu_ms_per_file(self) -> float:
        return self.cpu_seconds * 1000 / self.files

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


def make_inputs(folder: Path, n: int, side: int) -> list[Path]:
    """N Explicit VR Little Endian DX files of ``side``² 16-bit pixels, two per study."""
    from pydicom.uid import generate_uid

    from tests.support.builders import make_cxr

    folder.mkdir(parents=True, exist_ok=True)
    ds = make_cxr(rows=side, cols=side)
    paths = []
    for i in range(n):
        if i % 2 == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"img{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wait_for_echo(port: int, aet: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early with code {proc.returncode}")
        echo = subprocess.run(
            ["echoscu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"receiver on port {port} not ready after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def receiver(
    kind: str, work: Path, workers: int = 1, max_instance_bytes: int = 512 * 1024 * 1024
) -> Iterator[tuple[int, str, Path, int]]:
    """Start one receiver in its own process group; yields (port, called AE, storage dir,
    process id)."""
    port = free_port()
    store = work / "store"
    store.mkdir(parents=True)
    if kind in ("ours", "ours-nosync"):
        cmd = [sys.executable, __file__, "--serve-ours", str(work), str(port), str(workers),
               str(max_instance_bytes)]
        aet, env = OUR_AET, {**os.environ, "BENCH_NO_SYNC": "1" if kind == "ours-nosync" else ""}
    elif kind == "storescp":
        # --fork: one process per association, as dcmtk recommends for concurrent senders.
        cmd = ["storescp", "--fork", "+xa", "-od", str(store), "-aet", "STORESCP", str(port)]
        aet, env = "STORESCP", DCMTK_ENV
    elif kind == "orthanc":
        config = {
            "Name": "bench",
            "StorageDirectory": str(store),
            "IndexDirectory": str(work / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": port,
            "HttpPort": free_port(),
            "RemoteAccessAllowed": False,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "Plugins": [],
        }
        (work / "orthanc.json").write_text(json.dumps(config))
        cmd = ["Orthanc", str(work / "orthanc.json")]
        aet, env = "ORTHANC", os.environ
    else:
        raise ValueError(f"receiver must be ours, storescp or orthanc, not {kind!r}")
    log = (work / "receiver.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        _wait_for_echo(port, aet, proc, timeout=60)
        yield port, aet, store, proc.pid
    finally:
        _stop(proc)
        log.close()


def send(files: list[Path], port: int, aet: str, associations: int) -> float:
    """storescu over ``associations`` parallel associations; returns wall seconds."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port), *map(str, chunk)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    failed = [p for p in procs if p.wait() != 0]
    seconds = time.perf_counter() - start
    if failed:
        err = failed[0].stderr.read().decode(errors="replace") if failed[0].stderr else ""
        raise RuntimeError(f"storescu failed: {err[-500:]}")
    return seconds


def cpu_seconds(pgid: int) -> float:
    """User + system CPU of every live process of a process group, plus the children they
    reaped (``/proc/<pid>/stat``, proc(5)): storescp --fork runs one child per association."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile: its time is in its parent's reaped-children count
            continue
        if int(fields[2]) == pgid:  # field 5, pgrp
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def disk_only(files: list[Path], work: Path, threads: int) -> float:
    """The disk's ceiling for a durable receiver, without the network: ``threads`` threads
    write the same files the way the spool does (write, fsync, rename, folder fsync);
    returns wall seconds. The files are read into memory first."""
    from concurrent.futures import ThreadPoolExecutor

    work.mkdir(parents=True)
    blobs = [p.read_bytes() for p in files]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: write_durably(work, f"f{i}.dcm", blobs[i]), range(len(blobs))))
    return time.perf_counter() - start


def _run_one(
    kind: str, work: Path, files: list[Path], total: int, assocs: int, workers: int
) -> Run:
    if kind == "disk":
        cpu = time.process_time()
        seconds = disk_only(files, work, assocs)
        received = _count_received("ours", work)
        cpu = time.process_time() - cpu
    else:
        with receiver(kind, work, workers) as (port, aet, store, pid):
            cpu = cpu_seconds(pid)
            seconds = send(files, port, aet, assocs)
            received = _count_received(kind, store)
            cpu = cpu_seconds(pid) - cpu
    return Run(kind, assocs, len(files), total, seconds, received, cpu)


def _count_received(kind: str, store: Path) -> int:
    pattern = "*.dcm" if kind.startswith("ours") else "*"
    return sum(1 for p in store.rglob(pattern) if p.is_file())


def write_big(path: Path, nbytes: int) -> Path:
    """One DX instance whose Pixel Data is ``nbytes`` of zeros, written without holding it."""
    import struct

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import encode

    from tests.support.builders import make_cxr

    ds = make_cxr(rows=16, cols=16)
    columns = 16384
    ds.Rows, ds.Columns = nbytes // (2 * columns), columns
    del ds.PixelData
    header = encode(ds, False, True)
    assert header is not None
    pixel_len = ds.Rows * columns * 2
    chunk = bytes(1 << 20)
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta, enforce_standard=True)  # type: ignore[arg-type]
        fh.write(header + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_len))
        for _ in range(pixel_len // len(chunk)):
            fh.write(chunk)
        fh.write(bytes(pixel_len % len(chunk)))
    return path


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found for pid {pid}")


def memory(base: Path, whole_agent: bool) -> None:
    """Peak RSS of our listener receiving 1 x 1 GB, then 16 x 100 MB in parallel.

    ``whole_agent``: the full ``cxr-agent serve`` process (scheduler, drafts, worker with the
    ``fake`` grounder of the tests; audits wait for drafts, so only receiving is measured)
    instead of the listener alone.
    """
    (base / "in").mkdir()
    big = [write_big(base / "in" / "big.dcm", 1_000_000_000)]
    many = [write_big(base / "in" / f"m{i:02d}.dcm", 100_000_000) for i in range(16)]
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"process: {'cxr-agent serve' if whole_agent else 'the listener alone'}\n")
    print("| load | wall s | RSS before MiB | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for label, files, assocs in (("1 x 1 GB, 1 association", big, 1),
                                 ("16 x 100 MB, 16 associations", many, 16)):
        work = base / f"mem-{assocs}"
        with _memory_receiver(work, whole_agent) as (port, aet, pid):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _kib(pid, "VmRSS")
            seconds = send(files, port, aet, assocs)
            peak = _kib(pid, "VmHWM")
        shutil.rmtree(work, ignore_errors=True)
        print(f"| {label} | {seconds:.1f} | {before / 1024:.0f} | {peak / 1024:.0f} |", flush=True)


@contextmanager
def _memory_receiver(work: Path, whole_agent: bool) -> Iterator[tuple[int, str, int]]:
    limit = 2_000_000_000
    if not whole_agent:
        with receiver("ours", work, 1, max_instance_bytes=limit) as (port, aet, _, pid):
            yield port, aet, pid
        return
    from tests.support.agentproc import AgentProcess

    agent = AgentProcess(work, {
        # 16 parallel senders from one address (the per-address default is 8).
        "scp": {"max_instance_bytes": limit, "max_associations_per_address": 16},
        "pairing": {"no_draft_policy": "wait", "draft_wait_seconds": 3600},
        "logging": {"level": "WARNING"},
    })
    agent.start(timeout=120)
    try:
        yield agent.port, OUR_AET, agent.pid
    finally:
        agent.stop()


def serve_ours(work: Path, port: int, workers: int, max_instance_bytes: int) -> None:
    """Run our listener until SIGTERM (the benchmark's receiver process)."""
    import logging
    import threading

    from dicom_agent.config import load_settings
    from dicom_agent.scp import start_listener
    from dicom_agent.state import StateDB

    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("BENCH_NO_SYNC"):
        # ours-nosync: what durability costs, measured by taking it away in this benchmark
        # process only (never a setting of the agent).
        os.fsync = os.fdatasync = lambda fd: None
    settings = load_settings(
        paths={**var_paths(work), "spool": work / "store"},
        scp={"port": port, "min_free_bytes": 0, "workers": workers,
             "max_associations_per_address": 16,  # every sender is on loopback
             "max_instance_bytes": max_instance_bytes},
    )
    settings.ensure_folders()
    db = StateDB(settings.paths.state)
    listener = start_listener(settings, db)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    listener.stop()
    db.close()


def idle(work: Path, seconds: float = 3.0) -> None:
    """CPU of our listener process while 0, 4 and 16 associations are open and idle."""
    from pynetdicom import AE

    print("| idle associations | listener CPU, % of a core |\n| ---: | ---: |")
    with receiver("ours", work) as (port, aet, _, pid):
        for count in (0, 4, 16):
            ae = AE(ae_title="BENCH")
            ae.add_requested_context("1.2.840.10008.1.1")  # Verification
            assocs = [ae.associate("127.0.0.1", port, ae_title=aet) for _ in range(count)]
            try:
                if not all(a.is_established for a in assocs):
                    raise RuntimeError("an idle association was not accepted")
                time.sleep(1.0)
                cpu = cpu_seconds(pid)
                time.sleep(seconds)
                share = (cpu_seconds(pid) - cpu) / seconds * 100
                print(f"| {count} | {share:.1f} |", flush=True)
            finally:
                for assoc in assocs:
                    assoc.release()


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    import pydicom
    import pynetdicom

    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout
    orthanc = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True).stdout
    return (
        f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
        f"dcmtk {dcmtk.split()[2] if dcmtk else '?'}, "
        f"Orthanc {orthanc.split()[1] if orthanc else '?'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="files per run")
    parser.add_argument("--side", type=int, default=2236, help="image side (2236: ~10 MB)")
    parser.add_argument("--parallel", type=int, default=4, help="associations of the 2nd run")
    parser.add_argument(
        "--receivers", default="ours,ours-nosync,storescp,orthanc,disk",
        help="ours-nosync: ours with fsync and fdatasync made no-ops in its process; "
        "disk: no receiver, the same files written durably by as many threads",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--workers", type=int, default=1, help="our scp.workers")
    parser.add_argument("--memory", action="store_true", help="peak RSS run instead")
    parser.add_argument("--idle", action="store_true",
                        help="listener CPU with 0, 4 and 16 idle associations instead")
    parser.add_argument("--whole-agent", action="store_true",
                        help="with --memory: measure cxr-agent serve, not the listener alone")
    parser.add_argument("--serve-ours", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ours:
        work, port, workers, max_bytes = args.serve_ours
        serve_ours(Path(work), int(port), int(workers), int(max_bytes))
        return
    for binary in ("storescu", "echoscu", "storescp", "Orthanc"):
        if shutil.which(binary) is None:
            sys.exit(f"error: {binary} is not installed")
    if args.memory:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ingest-mem-") as tmp:
            memory(Path(tmp), args.whole_agent)
        return
    if args.idle:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ingest-idle-") as tmp:
            idle(Path(tmp))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ingest-bench-") as tmp:
        base = Path(tmp)
        files = make_inputs(base / "in", args.n, args.side)
        total = sum(p.stat().st_size for p in files)
        print(f"machine: {machine()}")
        print(f"versions: {versions()}")
        print(f"{args.n} files, {total / args.n / 1e6:.1f} MB each, ours with scp.workers={args.workers}\n")
        runs: list[Run] = []
        for kind in args.receivers.split(","):
            for assocs in sorted({1, args.parallel}):
                work = base / f"{kind}-{assocs}"
                runs.append(_run_one(kind, work, files, total, assocs, args.workers))
                shutil.rmtree(work, ignore_errors=True)
                r = runs[-1]
                print(
                    f"  {kind:9s} {assocs} assoc: {r.files_per_s:7.1f} files/s "
                    f"{r.mb_per_s:7.1f} MB/s {r.cpu_ms_per_file:6.1f} ms CPU/file "
                    f"({r.received} files on disk)",
                    flush=True,
                )
        print()
        print(table(runs))


def table(runs: list[Run]) -> str:
    """The results as a Markdown table, with ours / storescp per association count."""
    ref = {r.associations: r for r in runs if r.receiver == "storescp"}
    lines = [
        "| receiver | associations | files/s | MB/s | vs storescp | receiver CPU ms/file |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        base = ref.get(r.associations)
        ratio = f"{r.files_per_s / base.files_per_s:.2f}" if base else "-"
        lines.append(
            f"| {r.receiver} | {r.associations} | {r.files_per_s:.1f} | {r.mb_per_s:.0f} "
            f"| {ratio} | {r.cpu_ms_per_file:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
