"""``cxr-agent forward retry`` and ``cxr-agent state rebuild``, on real files and sockets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dicom_agent.agent import LOCK_FILE, StateLock
from dicom_agent.cli import app
from dicom_agent.config import load_settings
from dicom_agent.forward import drain_outbox, enqueue_forward
from dicom_agent.state import JobKind, JobState, StateDB
from tests.conftest import free_port
from tests.support.builders import make_cxr, save
from tests.support.storescp import Receiver

runner = CliRunner()


def _config(tmp_path: Path, port: int, **extra: object) -> Path:
    path = tmp_path / "agent.yaml"
    doc = {
        "paths": {
            "out": str(tmp_path / "out"),
            "state": str(tmp_path / "state" / "agent.sqlite3"),
            "spool": str(tmp_path / "spool"),
            "drafts": str(tmp_path / "drafts"),
        },
        "forward": {
            "destinations": [{"name": "research", "ae_title": "RESEARCHPACS",
                              "host": "127.0.0.1", "port": port, "research": True}],
            "max_attempts": 1,
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _dead_job(tmp_path: Path, config: Path) -> int:
    """A forward job that failed once against a closed port and is dead (max_attempts 1)."""
    settings = load_settings(config)
    result = save(make_cxr(), tmp_path / "out" / "sc.dcm")
    db = StateDB(settings.paths.state)
    (job_id,) = enqueue_forward(db, "1.2.3", [result], settings.forward.destinations, now=0.0)
    drain_outbox(db, settings, now=0.0)
    assert db.job(job_id).state == JobState.DEAD.value  # type: ignore[union-attr]
    db.close()
    return job_id


class TestForwardRetry:
    def test_lists_dead_jobs_then_requeues_and_sends_them(self, tmp_path: Path) -> None:
        port = free_port()
        config = _config(tmp_path, port)
        job_id = _dead_job(tmp_path, config)

        listing = runner.invoke(app, ["forward", "retry", "--config", str(config)])
        assert listing.exit_code == 1
        assert listing.output.startswith(f"{job_id}\tresearch\t1 attempts\t")
        assert "association failed" in listing.output

        scp = Receiver(port).start()
        try:
            sent = runner.invoke(app, ["forward", "retry", "--all", "--now", "--config", str(config)])
        finally:
            scp.stop()
        assert sent.exit_code == 0, sent.output
        assert "re-queued 1 forward job(s)" in sent.output and "delivered 1 of 1" in sent.output
        assert len(scp.received) == 1
        job = StateDB(load_settings(config).paths.state).job(job_id)
        assert job is not None and (job.state, job.attempts) == ("done", 1)

    def test_status_points_at_the_command(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        job_id = _dead_job(tmp_path, config)
        outcome = runner.invoke(app, ["status", "--config", str(config)])
        assert f"dead letter: forward job {job_id}" in outcome.output
        assert "cxr-agent forward retry" in outcome.output

    def test_unknown_id_changes_nothing(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        job_id = _dead_job(tmp_path, config)
        outcome = runner.invoke(app, ["forward", "retry", str(job_id), "999", "--config", str(config)])
        assert outcome.exit_code == 2
        assert "not dead forward jobs: 999" in outcome.output
        assert StateDB(load_settings(config).paths.state).jobs(JobState.DEAD, JobKind.FORWARD)


def _spool_two_instances(tmp_path: Path) -> list[str]:
    first = make_cxr()
    second = make_cxr(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, seed=1)
    for ds in (first, second):
        save(ds, tmp_path / "spool" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
             / f"{ds.SOPInstanceUID}.dcm")
    return [str(first.SOPInstanceUID), str(second.SOPInstanceUID)]


def _damage(path: Path) -> None:
    """Overwrite one page in the middle of a real SQLite file with junk."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(os.urandom(4096))


def _filled_db(path: Path) -> None:
    db = StateDB(path)
    for i in range(2000):  # enough pages for a page in the middle to be a table page
        db.record_draft(key=f"A{i}", key_kind="accession", file_name="x", sha256=str(i),
                        text="t" * 200, author=None, now=float(i))
    db.close()


class TestStateRebuild:
    def test_damaged_database_is_kept_aside_and_rebuilt_from_the_spool(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        state = load_settings(config).paths.state
        _filled_db(state)
        _damage(state)
        sops = _spool_two_instances(tmp_path)

        outcome = runner.invoke(app, ["state", "rebuild", "--config", str(config)])
        assert outcome.exit_code == 0, outcome.output
        assert "rebuilt from" in outcome.output and "2 instances in 1 studies" in outcome.output
        (kept,) = state.parent.glob("agent.sqlite3.damaged-*")
        assert kept.stat().st_size > 0
        db = StateDB(state)
        assert db.jobs() == [] and db.drafts() == []  # not in the spool: gone
        assert all(db.instance(uid) is not None for uid in sops)

    def test_healthy_database_needs_force(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        state = load_settings(config).paths.state
        StateDB(state).close()
        outcome = runner.invoke(app, ["state", "rebuild", "--config", str(config)])
        assert outcome.exit_code == 1 and "passes its check" in outcome.output
        assert list(state.parent.glob("*.damaged-*")) == []

    def test_refused_while_an_agent_holds_the_state_lock(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        state = load_settings(config).paths.state
        state.parent.mkdir(parents=True)
        lock = StateLock(state.parent / LOCK_FILE)
        try:
            outcome = runner.invoke(app, ["state", "rebuild", "--config", str(config)])
        finally:
            lock.release()
        assert outcome.exit_code == 2 and "holds the lock" in outcome.output


def test_serve_on_a_damaged_database_says_what_to_do(tmp_path: Path) -> None:
    """The real process: one error line naming the rebuild command, no traceback."""
    config = _config(tmp_path, free_port(), scp={"port": free_port()},
                     health={"port": free_port()})
    state = load_settings(config).paths.state
    _filled_db(state)
    _damage(state)
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_agent.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "is damaged" in proc.stderr and "cxr-agent state rebuild" in proc.stderr
    assert "Traceback" not in proc.stderr
