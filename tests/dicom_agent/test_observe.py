"""Observability: event vocabulary, JSON lines, salted study references, metrics, health."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES

from dicom_agent.config import LoggingSettings
from dicom_agent.observe import (
    OWN_LOGGERS,
    Event,
    JsonLinesFormatter,
    Metrics,
    event,
    load_salt,
    setup_logging,
    study_ref,
)
from dicom_agent.state import DraftState, StateDB

UID = "1.2.826.0.1.3680043.8.498.42"


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """A stream for :func:`setup_logging`; the global logging state is restored afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers),
             {name: logging.getLogger(name).level for name in OWN_LOGGERS})
    stream = io.StringIO()
    yield stream
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


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

    def test_setup_logging_json_and_libraries_at_warning(self, logs: io.StringIO) -> None:
        setup_logging(LoggingSettings(json_lines=True, level="DEBUG"), logs)
        logging.getLogger("dicom_agent.test").debug("hello", extra=event(event=Event.STUDY_SETTLED))
        for library in ("pynetdicom.assoc", "highdicom.base", "pydicom", "apscheduler"):
            logging.getLogger(library).info("dataset dump")
        (line,) = logs.getvalue().splitlines()
        assert json.loads(line)["event"] == "study.settled"

    def test_skipped_interval_runs_are_not_logged_other_scheduler_warnings_are(
        self, logs: io.StringIO
    ) -> None:
        """A real BackgroundScheduler whose job outlasts its interval: the skipped ticks say
        nothing; a job's own warning still gets through."""
        from apscheduler.schedulers.background import BackgroundScheduler

        setup_logging(LoggingSettings(), logs)
        release, ran = threading.Event(), threading.Event()

        def slow() -> None:
            ran.set()
            release.wait(5)

        sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        sched.add_job(slow, "interval", seconds=0.05, id="slow")
        sched.start()
        try:
            assert ran.wait(5)
            skipped = threading.Event()
            sched.add_listener(lambda _e: skipped.set(), EVENT_JOB_MAX_INSTANCES)
            assert skipped.wait(5)  # apscheduler did skip a run while slow() held the slot
        finally:
            release.set()
            sched.shutdown(wait=True)
        logging.getLogger("apscheduler.scheduler").warning("Run time of job was missed")
        assert "maximum number of running instances" not in logs.getvalue()
        assert "Run time of job was missed" in logs.getvalue()

    @pytest.mark.parametrize("json_lines", [False, True])
    def test_uids_are_hashed_in_messages_and_tracebacks(
        self, logs: io.StringIO, json_lines: bool
    ) -> None:
        setup_logging(LoggingSettings(json_lines=json_lines), logs)
        log = logging.getLogger("dicom_agent.test")
        log.warning("stored %s as 1.2.840.10008.5.1.4.1.1.1 from 10.0.0.12", UID)
        try:
            raise ValueError(f"bad instance {UID}")
        except ValueError:
            log.exception("failed")
        out = logs.getvalue()
        assert UID not in out
        assert out.count(f"uid:{study_ref(UID)}") == 2  # the message and the exception's
        assert "1.2.840.10008.5.1.4.1.1.1" in out and "10.0.0.12" in out  # SOP class, an IP

    @pytest.mark.parametrize("library_level", ["WARNING", "INFO"])
    def test_highdicom_lines_never_name_an_instance(
        self, logs: io.StringIO, tmp_path: Path, library_level: str
    ) -> None:
        """highdicom names the SOP Instance UID of each source data set at INFO while the SR,
        GSPS and SC are built: silent by default, hashed when libraries log at INFO."""
        from dicom_agent.config import load_settings
        from tests.support.studies import written_findings

        settings = load_settings(paths={"out": tmp_path / "out"})
        setup_logging(LoggingSettings(library_level=library_level), logs)
        study, _, _ = written_findings(tmp_path, settings)
        out = logs.getvalue()
        sources = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in study.sources.values()]
        assert sources and not any(uid in out for uid in sources)
        highdicom_lines = [ln for ln in out.splitlines() if "highdicom" in ln]
        if library_level == "INFO":
            assert any(f"uid:{study_ref(sources[0])}" in ln for ln in highdicom_lines)
        else:
            assert highdicom_lines == []

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
