"""``cxr-agent serve`` (config errors), ``status`` and ``reaudit`` through typer's CliRunner."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dicom_agent.cli import app
from dicom_agent.state import DraftState, JobState, StateDB, StudyState

UID = "1.2.826.0.1.3680043.8.498.77"
runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    var = tmp_path / "var"
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"paths": {
        "spool": str(var / "spool"), "drafts": str(var / "drafts"), "out": str(var / "out"),
        "state": str(var / "state" / "agent.sqlite3"), "quarantine": str(var / "q")}}))
    return path


def state_db(config: Path) -> StateDB:
    return StateDB(config.parent / "var" / "state" / "agent.sqlite3")


def seed(db: StateDB) -> int:
    """One audited study, one dead job, one orphan draft."""
    db.record_instance(
        sop_instance_uid=UID + ".1", study_instance_uid=UID, series_instance_uid=UID + ".2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", transfer_syntax_uid=None,
        view_position="PA", body_part="CHEST", accession_number="ACC-SECRET", path="/x.dcm",
        sha256="h", size=1, now=0,
    )
    db.set_study_state(UID, StudyState.WAITING_DRAFT, 1, settled_at=1)
    job = db.queue_audit(UID, None, "image_only", 1)
    db.claim_audit_jobs(1, 2)
    db.transition_job(job.id, JobState.DONE, 3)
    db.record_instance(
        sop_instance_uid="1.9.1", study_instance_uid="1.9", series_instance_uid="1.9.2",
        sop_class_uid="1.2", modality="DX", transfer_syntax_uid=None, view_position="PA",
        body_part="CHEST", accession_number=None, path="/y.dcm", sha256="g", size=1, now=0,
    )
    db.set_study_state("1.9", StudyState.WAITING_DRAFT, 1, settled_at=1)
    dead = db.queue_audit("1.9", None, "image_only", 1)
    db.claim_audit_jobs(8, 2)
    db.transition_job(dead.id, JobState.DEAD, 3, error="OutputError: disk full\ntraceback")
    _, draft = db.record_draft(key="ACC-ORPHAN", key_kind="accession", file_name="x.txt",
                               sha256="s", text="t", author=None, now=0)
    db.set_draft_state(draft, DraftState.ORPHAN, 5)
    return dead.id


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``serve`` configures the root logger; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class TestServe:
    def test_bad_config_prints_one_line_per_key_and_exits_2(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("scp:\n  port: 70000\n  ae_title: 'A\\\\B'\nbogus: 1\n")
        result = runner.invoke(app, ["serve", "--config", str(bad)])
        assert result.exit_code == 2
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 3
        assert any("scp.port" in ln for ln in lines) and any("scp.ae_title" in ln for ln in lines)
        assert any("bogus" in ln for ln in lines)
        assert "Traceback" not in result.output


    @pytest.mark.usefixtures("restore_logging")
    def test_port_in_use_is_one_line_and_exit_2(self, config: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            data = yaml.safe_load(config.read_text())
            data["scp"] = {"port": port}
            data["health"] = {"enabled": False}
            config.write_text(yaml.safe_dump(data))
            result = runner.invoke(app, ["serve", "--config", str(config)])
        assert result.exit_code == 2
        assert f"error: scp.port: cannot listen on 127.0.0.1:{port}" in result.output


class TestStatus:
    def test_status_reports_queue_orphans_dead_jobs_and_no_agent(self, config: Path) -> None:
        db = state_db(config)
        dead_id = seed(db)
        db.close()
        result = runner.invoke(app, ["status", "--config", str(config)])
        assert result.exit_code == 0, result.output
        out = result.output
        assert "agent: not running" in out
        (failed_row,) = [ln for ln in out.splitlines() if ln.startswith("  -") and " failed " in ln]
        assert "its audit failed (OutputError: disk full)" in failed_row
        assert "no agent is running" in failed_row
        assert "orphan drafts: 1" in out
        assert f"dead letter: audit job {dead_id}" in out and "OutputError: disk full" in out
        assert "traceback" not in out
        assert UID not in out and "ACC-SECRET" not in out and "ACC-ORPHAN" not in out

    def test_status_counts_drafts_refused_as_ambiguous(self, config: Path) -> None:
        from dicom_agent.scheduler import pair_drafts

        db = state_db(config)
        for study_uid in ("1.2.3.4.5.1", "1.2.3.4.5.2"):
            db.record_instance(
                sop_instance_uid=study_uid + ".9", study_instance_uid=study_uid,
                series_instance_uid=study_uid + ".8", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                modality="DX", transfer_syntax_uid=None, view_position="PA", body_part="CHEST",
                accession_number="ACC-TWICE", path=f"/n/{study_uid}.dcm", sha256=study_uid,
                size=1, now=0.0,
            )
        db.record_draft(key="ACC-TWICE", key_kind="accession", file_name="ACC-TWICE.txt",
                        sha256="1", text="x", author=None, now=1.0)
        pair_drafts(db, 2.0, 3600.0)
        db.close()
        result = runner.invoke(app, ["status", "--config", str(config)])
        assert "ambiguous drafts: 1 " in result.output

    def test_status_json_uses_the_heartbeat_of_a_running_agent(self, config: Path) -> None:
        db = state_db(config)
        seed(db)
        db.close()
        beat = {"pid": os.getpid(), "updated_at": time.time(), "stopped": False,
                "model": {"profile": "cxr-auditor-v2", "state": "unavailable",
                          "reason": "ModelUnavailable: no weights"},
                "listener": {"port": 11112}}
        (config.parent / "var" / "state" / "agent-status.json").write_text(json.dumps(beat))
        result = runner.invoke(app, ["status", "--json", "--config", str(config)])
        body = json.loads(result.output)
        assert body["agent"]["running"] is True
        assert body["model"]["state"] == "unavailable"
        assert body["jobs"]["done"] == 1 and body["jobs"]["dead"] == 1
        assert body["orphan_drafts"] == 1 and body["studies"]["audited"] == 1

    def test_status_lists_each_unfinished_study_and_what_it_waits_for(self, config: Path) -> None:
        db = state_db(config)
        now = time.time()

        def study(uid: str, accession: str, state: StudyState) -> None:
            db.record_instance(
                sop_instance_uid=uid + ".1", study_instance_uid=uid, series_instance_uid=uid + ".2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", transfer_syntax_uid=None,
                view_position="PA", body_part="CHEST", accession_number=accession, path=f"/{uid}.dcm",
                sha256=uid, size=1, now=now - 125,
            )
            if state != StudyState.RECEIVING:
                db.set_study_state(uid, StudyState.WAITING_DRAFT, now - 100, settled_at=now - 100)

        study(UID + "1", "ACC-RECV", StudyState.RECEIVING)
        study(UID + "2", "ACC-DRAFT", StudyState.WAITING_DRAFT)
        study(UID + "3", "ACC-MODEL", StudyState.QUEUED)
        job = db.queue_audit(UID + "3", None, "image_only", now - 90)
        db.claim_audit_jobs(1, now - 80)
        db.transition_job(job.id, JobState.WAITING_MODEL, now - 70)
        db.close()
        reason = "ModelUnavailable: " + "the hub cannot be reached from here " * 8 + "END-OF-REASON"
        beat = {"pid": os.getpid(), "updated_at": now, "stopped": False,
                "model": {"profile": "cxr-auditor-v2", "state": "unavailable", "reason": reason}}
        (config.parent / "var" / "state" / "agent-status.json").write_text(json.dumps(beat))

        out = runner.invoke(app, ["status", "--config", str(config)]).output
        assert "END-OF-REASON" in out  # the whole reason, not cut at a fixed width
        rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ACC-")}
        assert set(rows) == {"ACC-RECV", "ACC-DRAFT", "ACC-MODEL"}
        assert "receiving" in rows["ACC-RECV"] and "more images" in rows["ACC-RECV"]
        assert "waiting_draft" in rows["ACC-DRAFT"] and "a draft: audited without one in" in rows["ACC-DRAFT"]
        assert "the model: profile cxr-auditor-v2 is unavailable" in rows["ACC-MODEL"]
        assert "…" + (UID + "3")[-12:] in rows["ACC-MODEL"]
        assert "2m05s" in rows["ACC-MODEL"]  # age since its first image

        body = json.loads(runner.invoke(app, ["status", "--json", "--config", str(config)]).output)
        by_accession = {r["accession_number"]: r for r in body["study_rows"]}
        assert by_accession["ACC-MODEL"]["job_state"] == "waiting_model"
        assert by_accession["ACC-MODEL"]["study_instance_uid"] == UID + "3"
        assert body["unfinished_studies"] == 3
        one = runner.invoke(app, ["status", "--studies", "1", "--config", str(config)]).output
        assert "unfinished studies (1 newest of 3)" in one
        assert len([ln for ln in one.splitlines() if ln.startswith("  ACC-")]) == 1

    def test_json_is_a_plain_flag_in_the_help(self) -> None:
        out = runner.invoke(app, ["status", "--help"], terminal_width=100).output
        line = next(ln for ln in out.splitlines() if "--json" in ln)
        assert "<bool>" not in line

    def test_stale_heartbeat_means_not_running(self, config: Path) -> None:
        state_db(config).close()
        beat = {"pid": os.getpid(), "updated_at": time.time() - 3600, "model": {"state": "ready"}}
        (config.parent / "var" / "state" / "agent-status.json").write_text(json.dumps(beat))
        body = json.loads(runner.invoke(app, ["status", "--json", "--config", str(config)]).output)
        assert body["agent"]["running"] is False
        assert body["model"]["state"].startswith("unknown")

    def test_status_without_a_database_exits_2(self, config: Path) -> None:
        result = runner.invoke(app, ["status", "--config", str(config)])
        assert result.exit_code == 2 and "no state database" in result.output


class TestReaudit:
    def test_reaudit_queues_the_next_version(self, config: Path) -> None:
        db = state_db(config)
        seed(db)
        db.close()
        result = runner.invoke(app, ["reaudit", UID, "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert "(result version 2)" in result.output
        db = state_db(config)
        job = db.latest_audit_job(UID)
        assert job is not None and job.state == "queued" and job.result_version == 2
        assert json.loads(job.payload or "{}") == {"reason": "reaudit"}
        assert db.study(UID).state == "queued"  # type: ignore[union-attr]

    def test_reaudit_by_accession_number_says_what_it_matched(self, config: Path) -> None:
        db = state_db(config)
        seed(db)
        db.close()
        result = runner.invoke(app, ["reaudit", "ACC-SECRET", "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert "matched by accession number" in result.output
        db = state_db(config)
        job = db.latest_audit_job(UID)
        assert job is not None and job.state == "queued" and job.result_version == 2
        db.close()
        again = runner.invoke(app, ["reaudit", UID, "--config", str(config)]).output
        assert "matched by Study Instance UID" in again

    def test_reaudit_of_an_accession_two_studies_hold_exits_2(self, config: Path) -> None:
        db = state_db(config)
        for uid in (UID, UID + "9"):
            db.record_instance(
                sop_instance_uid=uid + ".1", study_instance_uid=uid, series_instance_uid=uid + ".2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", transfer_syntax_uid=None,
                view_position="PA", body_part="CHEST", accession_number="ACC-TWICE", path=f"/{uid}.dcm",
                sha256=uid, size=1, now=0,
            )
        db.close()
        result = runner.invoke(app, ["reaudit", "ACC-TWICE", "--config", str(config)])
        assert result.exit_code == 2 and "held by 2 studies" in result.output

    def test_reaudit_of_an_unknown_study_exits_2(self, config: Path) -> None:
        state_db(config).close()
        result = runner.invoke(app, ["reaudit", "1.2.3", "--config", str(config)])
        assert result.exit_code == 2 and "unknown study" in result.output

    def test_reaudit_of_a_study_whose_images_were_purged_exits_2(self, config: Path) -> None:
        db = state_db(config)
        seed(db)
        assert len(db.take_expired_instances(UID, 10)) == 1
        db.close()
        result = runner.invoke(app, ["reaudit", UID, "--config", str(config)])
        assert result.exit_code == 2 and "images are gone" in result.output
