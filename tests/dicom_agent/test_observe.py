"""Observability: event vocabulary, JSON lines, salted study references, metrics, health."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import httpx
import pytest

from dicom_agent.config import LoggingSettings
from dicom_agent.observe import (
    Event,
    HealthServer,
    JsonLinesFormatter,
    Metrics,
    event,
    load_salt,
    setup_logging,
    study_ref,
)
from dicom_agent.state import DraftState, StateDB

UID = "1.2.826.0.1.3680043.8.498.42"


class TestStudyRef:
    def test_salted_stable_and_short(self, tmp_path: Path) -> None:
        load_salt(tmp_path / "a")
        first = study_ref(UID)
        load_salt(tmp_path / "a")
        assert study_ref(UID) == first and len(first) == 12 and UID not in first
        assert (tmp_path / "a" / "log-salt").stat().st_mode & 0o777 == 0o600
        load_salt(tmp_path / "b")
        assert study_ref(UID) != first
        assert study_ref(None) == "-"


class TestLogging:
    def test_json_lines_carry_event_fields(self) -> None:
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, "audit %s", ("done",), None)
        for k, v in event(event=Event.AUDIT_DONE, job_id=3, study="abc").items():
            setattr(rec, k, v)
        out = json.loads(JsonLinesFormatter().format(rec))
        assert out["event"] == "audit.done" and out["job_id"] == 3 and out["msg"] == "audit done"
        assert out["level"] == "INFO" and out["study"] == "abc"

    def test_setup_logging_json_and_pynetdicom_at_warning(self) -> None:
        stream = io.StringIO()
        setup_logging(LoggingSettings(json_lines=True, level="DEBUG"), stream)
        try:
            logging.getLogger("dicom_agent.test").info(
                "hello", extra=event(event=Event.STUDY_SETTLED))
            logging.getLogger("pynetdicom.assoc").info("dataset dump")
        finally:
            logging.getLogger().handlers.clear()
        (line,) = stream.getvalue().splitlines()
        assert json.loads(line)["event"] == "study.settled"
        assert logging.getLogger("pynetdicom").level == logging.WARNING

    def test_event_names_are_unique_and_dotted(self) -> None:
        values = [e.value for e in Event]
        assert len(values) == len(set(values))
        assert all("." in v for v in values)
        assert {"instance.stored", "draft.orphan", "job.dead", "model.unavailable"} <= set(values)


class TestMetricsAndHealth:
    @pytest.fixture
    def db(self, tmp_path: Path) -> StateDB:
        db = StateDB(tmp_path / "s.sqlite3")
        db.record_draft(key="A", key_kind="accession", file_name="A.txt", sha256="1", text="t",
                        author=None, now=0)
        db.set_draft_state(1, DraftState.ORPHAN, 1)
        return db

    def test_refresh_reports_orphans_and_job_states(self, db: StateDB) -> None:
        m = Metrics()
        m.refresh(db)
        text = m.render().decode()
        assert "cxr_agent_orphan_drafts 1.0" in text
        assert 'cxr_agent_jobs{state="dead"} 0.0' in text

    def test_health_endpoint_serves_json_status_and_metrics(self, db: StateDB) -> None:
        m = Metrics()
        body = {"serving": True, "model": {"state": "unavailable"}}
        server = HealthServer("127.0.0.1", 0, lambda: body, m.render)
        server.start()
        try:
            base = f"http://127.0.0.1:{server.port}"
            r = httpx.get(base + "/healthz")
            assert r.status_code == 200 and r.json()["model"]["state"] == "unavailable"
            body["serving"] = False
            assert httpx.get(base + "/healthz").status_code == 503
            r = httpx.get(base + "/metrics")
            assert r.status_code == 200 and "cxr_agent_model_available" in r.text
            assert httpx.get(base + "/nope").status_code == 404
        finally:
            server.stop()
