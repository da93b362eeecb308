"""Load and soak benchmark of the whole running agent (ingest + pairing + audit + outputs).

Starts ``cxr-agent serve`` as a subprocess in a temporary root (the same harness as the
integration tests, :mod:`tests.support.agentproc`), with the deterministic ``fake`` grounder: the
figures measure the agent's own plumbing (DICOM, spool, state, scheduling, pixels, SR/GSPS/SC/
PNG/JSON outputs), not a model. Instances are small synthetic chest radiographs
(``--size`` x ``--size``, 12 bits) sent by dcmtk ``storescu`` over ``--senders`` parallel
associations (load mode: one association per sender for its whole share of studies; soak
mode: one association per study).

Load mode (default) reports: instances/s acknowledged, studies audited/s, p50/p99 of the time
from the last instance of a study being stored to its ``audit.json`` on disk (this includes
``pairing.settle_seconds``, stated in the output), and the agent's peak RSS (VmHWM).

Soak mode (``--soak-minutes M``) keeps sending for M minutes at whatever rate the agent
sustains and samples the agent's RSS every ``--rss-interval`` seconds, to show that memory
does not grow without bound; it reports the samples and the growth between the medians of
the second and the last quarter of the run.

Run: ``.venv/bin/python benchmarks/load.py`` or ``... --soak-minutes 10``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: reuse the test harness

from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402
from tests.support.agentproc import AgentProcess, storescu, wait_until  # noqa: E402
from tests.support.builders import make_cxr  # noqa: E402


@dataclass
class Study:
    uid: str
    files: list[Path]


def mapping_rss_kib(pid: int) -> dict[str, int]:
    """Resident KiB of the process by kind of mapping (/proc/PID/smaps): ``anon`` (no file),
    ``heap`` (the brk heap), ``file`` (everything mapped from a file, libraries included)."""
    out = {"anon": 0, "heap": 0, "file": 0}
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            name = fields[5] if len(fields) > 5 else ""
            kind = "heap" if name == "[heap]" else "anon" if not name or name.startswith("[") else "file"
        elif fields[0] == "Rss:":
            out[kind] += int(fields[1])
    return out


@dataclass
class RssSampler:
    """Samples the agent's VmRSS (KiB) every ``interval`` seconds in a thread, and with
    ``smaps`` its resident memory by kind of mapping too."""

    agent: AgentProcess
    interval: float
    smaps: bool = False
    samples: list[tuple[float, int]] = field(default_factory=list)
    mappings: list[dict[str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        t0 = time.monotonic()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.monotonic() - t0, self.agent.rss_kib()))
                    if self.smaps:
                        self.mappings.append(mapping_rss_kib(self.agent.pid))
                except (OSError, RuntimeError):
                    return  # agent gone
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the peak resident set size of the process so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM not found")


class StudyFactory:
    """Writes synthetic studies (fresh UIDs, shared pixels) as PS3.10 files."""

    def __init__(self, folder: Path, size: int, images: int) -> None:
        self.folder = folder
        self.images = images
        self.template = make_cxr(rows=size, cols=size)
        self._n = 0
        self._lock = threading.Lock()

    def make(self) -> Study:
        with self._lock:
            self._n += 1
            n = self._n
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for k in range(self.images):
            ds = self.template.copy()
            ds.file_meta = FileMetaDataset(self.template.file_meta)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = f"LOAD{n:07d}"
            ds.InstanceNumber = k + 1
            path = self.folder / f"{n:07d}_{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        return Study(study_uid, files)


def send_studies(port: int, studies: list[Study]) -> int:
    """Send the studies over one storescu association; return instances acknowledged.

    storescu stops at the first refused instance, so a non-zero exit counts nothing: the
    benchmark's figures are only reported for runs where every instance was acknowledged.
    """
    files = [f for study in studies for f in study.files]
    done = storescu(port, files, timeout=1800)
    if done.returncode != 0:
        print(f"storescu failed ({done.returncode}): {done.stderr.strip()[:300]}", file=sys.stderr)
        return 0
    return len(files)


def result_times(agent: AgentProcess, study_uids: set[str]) -> dict[str, float]:
    """mtime of the first ``audit.json`` of each study that has one."""
    out: dict[str, float] = {}
    root = agent.path("out")
    for uid in study_uids:
        found = sorted(root.glob(f"{uid}/**/audit.json"), key=lambda p: p.stat().st_mtime)
        if found:
            out[uid] = found[0].stat().st_mtime
    return out


def last_instance_times(agent: AgentProcess) -> dict[str, float]:
    rows = agent.db_query(
        "SELECT study_instance_uid AS s, MAX(received_at) AS t FROM instances GROUP BY s"
    )
    return {r["s"]: r["t"] for r in rows}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_load(agent: AgentProcess, factory: StudyFactory, args: argparse.Namespace) -> dict:
    n_studies = args.instances // args.images_per_study
    studies = [factory.make() for _ in range(n_studies)]
    shares = [studies[i :: args.senders] for i in range(args.senders)]
    sampler = RssSampler(agent, interval=1.0)
    sampler.start()
    acked = [0] * args.senders
    t0 = time.time()

    def run(i: int) -> None:
        acked[i] = send_studies(agent.port, shares[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_sent = time.time()
    uids = {s.uid for s in studies}
    wait_until(
        lambda: len(result_times(agent, uids)) == len(uids),
        timeout=args.result_timeout,
        what="every study's audit.json",
        interval=1.0,
        alive=agent.check_alive,
    )
    results = result_times(agent, uids)
    t_done = max(results.values())
    sampler.stop()
    last = last_instance_times(agent)
    latencies = [results[u] - last[u] for u in uids]
    return {
        "mode": "load",
        "senders": args.senders,
        "studies": n_studies,
        "instances_sent": n_studies * args.images_per_study,
        "instances_acked": sum(acked),
        "ingest_seconds": round(t_sent - t0, 2),
        "instances_per_s": round(sum(acked) / (t_sent - t0), 1),
        "studies_audited_per_s": round(len(results) / (t_done - t0), 2),
        "result_latency_p50_s": round(percentile(latencies, 50), 2),
        "result_latency_p99_s": round(percentile(latencies, 99), 2),
        "settle_seconds": agent.config["pairing"]["settle_seconds"],
        "peak_rss_mib": round(peak_rss_kib(agent.pid) / 1024, 1),
        "rss_samples_mib": [round(kib / 1024, 1) for _, kib in sampler.samples[:: max(1, len(sampler.samples) // 20)]],
    }


def run_soak(agent: AgentProcess, factory: StudyFactory, args: argparse.Namespace) -> dict:
    sampler = RssSampler(agent, interval=args.rss_interval, smaps=args.smaps)
    sampler.start()
    deadline = time.monotonic() + args.soak_minutes * 60
    sent: list[str] = []
    acked = [0] * args.senders
    lock = threading.Lock()

    def run(i: int) -> None:
        while time.monotonic() < deadline:
            study = factory.make()
            acked[i] += send_studies(agent.port, [study])
            with lock:
                sent.append(study.uid)
            for f in study.files:
                f.unlink()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.stop()
    results = result_times(agent, set(sent))
    rss = [kib / 1024 for _, kib in sampler.samples]
    quarter = max(1, len(rss) // 4)
    return {
        "mode": "soak",
        "minutes": args.soak_minutes,
        "senders": args.senders,
        "studies_sent": len(sent),
        "instances_acked": sum(acked),
        "studies_with_result_at_end": len(results),
        "rss_interval_s": args.rss_interval,
        "rss_samples_mib": [round(v, 1) for v in rss],
        "rss_median_q2_mib": round(statistics.median(rss[quarter : 2 * quarter]), 1),
        "rss_median_q4_mib": round(statistics.median(rss[-quarter:]), 1),
        "peak_rss_mib": round(peak_rss_kib(agent.pid) / 1024, 1),
        # resident MiB by kind of mapping (--smaps), where the RSS medians start and at the end
        **{
            f"{kind}_mib_q2_start_end": [
                round(sampler.mappings[i][kind] / 1024, 1) for i in (quarter, -1)
            ]
            for kind in ("anon", "heap", "file")
            if len(sampler.mappings) > quarter
        },
    }


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=16, help="parallel associations")
    parser.add_argument("--instances", type=int, default=2000, help="load mode: total instances")
    parser.add_argument("--images-per-study", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each image")
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--rss-interval", type=float, default=10.0, help="soak RSS sampling, s")
    parser.add_argument("--result-timeout", type=float, default=1800.0)
    parser.add_argument("--root", type=Path, default=None, help="keep the agent's folders here")
    parser.add_argument(
        "--smaps", action="store_true", help="soak: also sample RSS by kind of mapping (smaps)"
    )
    parser.add_argument(
        "--wrap", default="", help="run the agent under this command, e.g. 'memray run --native -o m.bin'"
    )
    args = parser.parse_args(argv)
    if shutil.which("storescu") is None:
        parser.error("dcmtk storescu is needed")

    root = args.root or Path(tempfile.mkdtemp(prefix="cxr-load-"))
    (root / "in").mkdir(parents=True, exist_ok=True)
    agent = AgentProcess(
        root / "agent",
        {
            # Headroom: a sender's next association can arrive while its previous one is
            # still winding down, which pynetdicom counts against the limit.
            "scp": {"max_associations": args.senders + 4,
                    "max_associations_per_address": args.senders + 4},  # all on loopback
            "logging": {"level": "WARNING"},
            "pairing": {"draft_wait_seconds": 0},  # no drafts are sent: audit image-only at once
        },
        wrapper=shlex.split(args.wrap),
    )
    factory = StudyFactory(root / "in", args.size, args.images_per_study)
    agent.start()
    try:
        if args.soak_minutes > 0:
            report = run_soak(agent, factory, args)
        else:
            report = run_load(agent, factory, args)
    finally:
        agent.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    report["grounder"] = "fake (deterministic, no model)"
    report["image"] = f"{args.size}x{args.size} 12-bit DX, {args.images_per_study} per study"
    report["machine"] = machine()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
