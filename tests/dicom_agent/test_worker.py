"""The worker: routing, batching, outputs, retries, dead letters and the model-unavailable path.

Models are FakeGrounders injected through the auditor factory; the clock is a variable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cxr_auditor.errors import BackendError, ModelUnavailable
from cxr_auditor.grounding.fake import FakeGrounder
from cxr_auditor.pipeline import Auditor
from dicom_agent.config import AgentSettings
from dicom_agent.registry import Models
from dicom_agent.scheduler import Reason, queue_audit
from dicom_agent.state import JobKind, JobState, StateDB, StudyState
from dicom_agent.worker import Worker
from tests.support.builders import SENTINEL_PATIENT_NAME, make_cxr, save

DARK = (3000.0, 1000.0)  # window that makes the phantom dark: the fake answers no_finding


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(settings: AgentSettings) -> StateDB:
    return StateDB(settings.paths.state)


def store(
    settings: AgentSettings, db: StateDB, study_uid: str, recorded_at: float | None = 0,
    **kw: object,
) -> str:
    """Save a radiograph in the spool and record it; ``recorded_at`` None records it when the
    file was written, as the listener does (a start-up spool check then leaves it alone)."""
    ds = make_cxr(rows=96, cols=80, study_uid=study_uid, accession="ACC-SENTINEL", **kw)  # type: ignore[arg-type]
    path = save(ds, settings.paths.spool / study_uid / f"{ds.SOPInstanceUID}.dcm")
    db.record_instance(
        sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=study_uid,
        series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
        modality=ds.Modality, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        view_position=ds.ViewPosition, body_part=ds.BodyPartExamined,
        accession_number=ds.AccessionNumber, path=str(path), sha256=ds.SOPInstanceUID, size=1,
        now=path.stat().st_mtime if recorded_at is None else recorded_at,
    )
    return str(ds.SOPInstanceUID)


def queue(db: StateDB, study_uid: str, now: float) -> int:
    db.set_study_state(study_uid, StudyState.WAITING_DRAFT, now, settled_at=now)
    return queue_audit(db, study_uid, None, Reason.IMAGE_ONLY, now).id


def make_worker(settings: AgentSettings, db: StateDB, clock: Clock, factory) -> Worker:  # type: ignore[no-untyped-def]
    return Worker(settings, db, Models(factory, settings.worker.model_retry_seconds, clock=clock),
                  clock=clock)


def sidecar(settings: AgentSettings, study_uid: str) -> dict:  # type: ignore[type-arg]
    return json.loads((settings.paths.out / study_uid / "audit.json").read_text())


class TestAudit:
    def test_image_only_audit_writes_outputs_and_marks_done(
        self, settings: AgentSettings, db: StateDB, clock: Clock, caplog: pytest.LogCaptureFixture
    ) -> None:
        pa = store(settings, db, "1.2.3.1")
        lat = store(settings, db, "1.2.3.1", view_position="LL")
        job_id = queue(db, "1.2.3.1", clock.now)
        grounder = FakeGrounder.from_rule("mean_brightness")
        worker = make_worker(settings, db, clock, lambda name: Auditor(grounder, None))
        with caplog.at_level(logging.DEBUG):
            assert worker.run_once() == 1
        worker.stop()
        assert db.job(job_id).state == "done"  # type: ignore[union-attr]
        assert db.study("1.2.3.1").state == "audited"  # type: ignore[union-attr]
        out = sidecar(settings, "1.2.3.1")
        assert out["mode"] == "image_only" and out["result_version"] == 1
        assert [i["image_id"] for i in out["inputs"]["images"]] == [pa]
        assert out["inputs"]["skipped_images"] == [{"image_id": lat, "reason": "lateral_view"}]
        assert {f["label"] for f in out["grounding"]["findings"]} == {"pneumothorax", "pleural_effusion"}
        assert [f["kind"] for f in out["flags"]] == ["urgent"]
        assert {"decode_ms", "model_ms", "grounding_ms"} <= set(out["timings"])
        assert all(stage.endswith("_ms") for stage in out["timings"])  # the unit is in the key
        assert (settings.paths.out / "1.2.3.1" / "v1" / "overlay-0.png").exists()
        assert "audit.done" in [getattr(r, "event", None) for r in caplog.records]
        assert SENTINEL_PATIENT_NAME not in caplog.text and "ACC-SENTINEL" not in caplog.text
        assert "1.2.3.1" not in caplog.text

    def test_jobs_of_several_studies_share_one_grounder_call(
        self, settings: AgentSettings, db: StateDB, clock: Clock
    ) -> None:
        for n in range(3):
            store(settings, db, f"1.2.4.{n}")
            queue(db, f"1.2.4.{n}", clock.now)
        grounder = FakeGrounder.from_rule("mean_brightness")
        worker = make_worker(settings, db, clock, lambda name: Auditor(grounder, None))
        assert worker.run_once() == 3
        worker.stop()
        assert grounder.batch_sizes == [3]
        assert db.counts()["jobs"] == {"done": 3}

    def test_an_undecodable_image_is_skipped_not_fatal(
        self, settings: AgentSettings, db: StateDB, clock: Clock
    ) -> None:
        good = store(settings, db, "1.2.5.1", window=DARK)
        bad = store(settings, db, "1.2.5.1")
        Path(db.instance(bad).path).write_bytes(b"not dicom")  # type: ignore[union-attr]
        queue(db, "1.2.5.1", clock.now)
        worker = make_worker(settings, db, clock,
                             lambda name: Auditor(FakeGrounder.from_rule("mean_brightness"), None))
        worker.run_once()
        worker.stop()
        out = sidecar(settings, "1.2.5.1")
        assert [i["image_id"] for i in out["inputs"]["images"]] == [good]
        assert out["inputs"]["skipped_images"] == [{"image_id": bad, "reason": "decode_failed"}]
        assert out["grounding"]["findings"][0]["label"] == "no_finding"


class _Broken:
    """A grounder whose backend fails on every call."""

    info = FakeGrounder("[]").info

    def ground(self, images):  # type: ignore[no-untyped-def]
        raise BackendError("inference server answered 503")

    def close(self) -> None:
        pass


class TestFailures:
    def test_failure_schedules_a_retry_with_backoff_then_dead_letters(
        self, settings: AgentSettings, db: StateDB, clock: Clock
    ) -> None:
        s = settings.model_copy(update={"worker": settings.worker.model_copy(
            update={"max_attempts": 2, "retry_backoff_seconds": 30})})
        store(s, db, "1.2.6.1")
        job_id = queue(db, "1.2.6.1", clock.now)
        worker = make_worker(s, db, clock, lambda name: Auditor(_Broken(), None))  # type: ignore[arg-type]
        worker.run_once()
        job = db.job(job_id)
        assert job is not None
        assert (job.state, job.attempts, job.next_attempt_at) == ("queued", 1, clock.now + 30)
        assert "BackendError: inference server answered 503" in (job.last_error or "")
        assert worker.run_once() == 0  # not due yet
        clock.now += 30
        worker.run_once()
        worker.stop()
        job = db.job(job_id)
        assert (job.state, job.attempts) == ("dead", 2)  # type: ignore[union-attr]
        assert db.study("1.2.6.1").state == "failed"  # type: ignore[union-attr]

    def test_model_unavailable_parks_jobs_and_drains_them_once_it_loads(
        self, settings: AgentSettings, db: StateDB, clock: Clock
    ) -> None:
        store(settings, db, "1.2.7.1")
        job_id = queue(db, "1.2.7.1", clock.now)
        available = {"yes": False}

        def factory(name: str) -> Auditor:
            if not available["yes"]:
                raise ModelUnavailable("no weights for google/medgemma here")
            return Auditor(FakeGrounder.from_rule("mean_brightness"), None)

        worker = make_worker(settings, db, clock, factory)
        assert worker.run_once() == 0
        assert db.job(job_id).state == JobState.WAITING_MODEL.value  # type: ignore[union-attr]
        status = worker.models.status()[settings.grounding.profile]
        assert status["state"] == "unavailable" and "no weights" in status["reason"]
        available["yes"] = True
        assert worker.run_once() == 0  # retry not due yet: nothing is lost, nothing runs
        clock.now += settings.worker.model_retry_seconds
        assert worker.run_once() == 1
        worker.stop()
        assert db.job(job_id).state == "done"  # type: ignore[union-attr]
        assert worker.models.status()[settings.grounding.profile]["state"] == "ready"

    def test_rerun_with_different_content_never_overwrites_a_version(
        self, settings: AgentSettings, db: StateDB, clock: Clock
    ) -> None:
        store(settings, db, "1.2.8.1")
        queue(db, "1.2.8.1", clock.now)
        worker = make_worker(settings, db, clock,
                             lambda name: Auditor(FakeGrounder.from_rule("mean_brightness"), None))
        worker.run_once()
        first = sidecar(settings, "1.2.8.1")
        # a crash left version 2 on disk with other content before its job was marked done
        job = queue_audit(db, "1.2.8.1", None, Reason.REAUDIT, clock.now)
        assert job.result_version == 2
        v2 = settings.paths.out / "1.2.8.1" / "v2"
        v2.mkdir()
        (v2 / "audit.json").write_text(
            json.dumps({**first, "result_version": 2, "notes": ["another run"]}))
        worker.run_once()
        worker.stop()
        assert sidecar(settings, "1.2.8.1")["result_version"] == 3
        assert json.loads((v2 / "audit.json").read_text())["notes"] == ["another run"]
        assert db.job(job.id).result_version == 3  # type: ignore[union-attr]


class TestThreadedLoop:
    def test_started_worker_drains_the_queue(
        self, settings: AgentSettings, db: StateDB
    ) -> None:
        for n in range(4):
            store(settings, db, f"1.2.9.{n}")
            queue(db, f"1.2.9.{n}", 0)
        s = settings.model_copy(update={"worker": settings.worker.model_copy(
            update={"batch_size": 2, "batch_wait_seconds": 0.05})})
        grounder = FakeGrounder.from_rule("mean_brightness")
        worker = Worker(s, db, Models(lambda name: Auditor(grounder, None), 60))
        worker.start()
        try:
            import time

            deadline = time.monotonic() + 20
            while db.counts()["jobs"].get("done", 0) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            worker.stop()
        assert db.counts()["jobs"] == {"done": 4}
        assert sum(grounder.batch_sizes) == 4 and max(grounder.batch_sizes) <= 2

    def test_a_loop_error_puts_claimed_jobs_back_and_they_finish(
        self, settings: AgentSettings, db: StateDB, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected error outside any job's handling leaves no job stuck in ``running``."""
        import time

        for n in range(3):
            store(settings, db, f"1.2.8.{n}")
            queue(db, f"1.2.8.{n}", 0)
        s = settings.model_copy(update={"worker": settings.worker.model_copy(
            update={"batch_size": 1, "batch_wait_seconds": 0.0})})
        worker = Worker(s, db, Models(
            lambda name: Auditor(FakeGrounder.from_rule("mean_brightness"), None), 60))
        real_audit, calls = worker._audit, []

        def audit_failing_once(prepared):  # type: ignore[no-untyped-def]
            calls.append(len(prepared))
            if len(calls) == 1:
                raise RuntimeError("unexpected worker bug")
            return real_audit(prepared)

        monkeypatch.setattr(worker, "_audit", audit_failing_once)
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while db.counts()["jobs"].get("done", 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            worker.stop()
        assert db.counts()["jobs"] == {"done": 3}
        assert len(calls) >= 4  # the failed batch ran again


class _Hung:
    """A grounder whose backend never answers in time."""

    info = FakeGrounder("[]").info

    def ground(self, images):  # type: ignore[no-untyped-def]
        import time

        time.sleep(2)
        return []

    def close(self) -> None:
        pass


def test_hung_model_call_times_out_and_the_job_retries(
    settings: AgentSettings, db: StateDB, clock: Clock
) -> None:
    s = settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"job_timeout_seconds": 0.2})})
    store(s, db, "1.2.10.1")
    job_id = queue(db, "1.2.10.1", clock.now)
    worker = make_worker(s, db, clock, lambda name: Auditor(_Hung(), None))  # type: ignore[arg-type]
    worker.run_once()
    worker.stop()
    job = db.job(job_id)
    assert job is not None and job.state == "queued" and job.attempts == 1
    assert "TimeoutError: model call exceeded worker.job_timeout_seconds=0.2" in (job.last_error or "")
    assert worker.models.status()[s.grounding.profile]["state"] == "unavailable"


def test_stop_puts_claimed_jobs_that_did_not_run_back_in_the_queue(
    settings: AgentSettings, db: StateDB, clock: Clock
) -> None:
    store(settings, db, "1.2.11.1")
    job_id = queue(db, "1.2.11.1", clock.now)
    worker = make_worker(settings, db, clock,
                         lambda name: Auditor(FakeGrounder.from_rule("mean_brightness"), None))
    (claimed,) = worker._claim_batch(wait=False)  # claimed, then the agent is asked to stop
    assert db.job(job_id).state == "running"  # type: ignore[union-attr]
    worker.stop()
    job = db.job(job_id)
    assert job is not None and job.state == "queued" and job.next_attempt_at == clock.now


def test_finished_audit_queues_its_dicom_objects_for_research_destinations(
    settings: AgentSettings, db: StateDB, clock: Clock
) -> None:
    s = settings.model_copy(update={"forward": settings.forward.model_validate({
        "enabled": True,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                          "research": True}]})})
    store(s, db, "1.2.12.1")
    queue(db, "1.2.12.1", clock.now)
    worker = make_worker(s, db, clock,
                         lambda name: Auditor(FakeGrounder.from_rule("mean_brightness"), None))
    worker.run_once()
    worker.stop()
    (fwd,) = db.jobs(kind=JobKind.FORWARD)
    payload = json.loads(fwd.payload or "{}")
    assert payload["destination"] == "pacs" and fwd.state == "queued"
    names = [Path(p).name for p in payload["files"]]
    assert names[0] == "sr.dcm" and "gsps-0.dcm" in names
    assert all(Path(p).parent.name == "v1" for p in payload["files"])


class _BlockedChat:
    """A chat backend that says every vessel is blocked."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, requests, settings):  # type: ignore[no-untyped-def]
        self.batches.append(len(requests))
        return ["blocked"] * len(requests)

    def close(self) -> None:
        pass


def test_xa_study_goes_to_the_classification_profile(
    settings: AgentSettings, db: StateDB, clock: Clock
) -> None:
    from cxr_auditor.classification import PatencyClassifier
    from cxr_auditor.pipeline import ClassificationAuditor
    from cxr_auditor.profiles import parse_profile
    from tests.support.builders import make_xa_run

    s = settings.model_copy(update={"grounding": settings.grounding.model_copy(
        update={"xa_profile": "dsa-test"})})
    ds = make_xa_run(rows=64, cols=64)
    ds.StudyInstanceUID = "1.2.13.1"
    path = save(ds, s.paths.spool / "xa.dcm")
    db.record_instance(
        sop_instance_uid=ds.SOPInstanceUID, study_instance_uid="1.2.13.1",
        series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID, modality="XA",
        transfer_syntax_uid=None, view_position=None, body_part=None, accession_number=None,
        path=str(path), sha256="x", size=1, now=0)
    queue(db, "1.2.13.1", clock.now)
    chat = _BlockedChat()
    profile = parse_profile({"name": "dsa-test", "task": "classification", "backend": "fake"})
    loaded: list[str] = []

    def factory(name: str):  # type: ignore[no-untyped-def]
        loaded.append(name)
        if name == "dsa-test":
            return ClassificationAuditor(PatencyClassifier(profile, chat=chat))
        return Auditor(FakeGrounder.from_rule("mean_brightness"), None)

    worker = make_worker(s, db, clock, factory)
    worker.run_once()
    worker.stop()
    out = sidecar(s, "1.2.13.1")
    assert loaded == [s.grounding.profile, "dsa-test"]
    assert out["mode"] == "no_flags" and out["grounding"]["state"] == "skipped"
    assert out["classification"]["label"] == "blocked" and out["classification"]["urgent"] is True
    assert out["inputs"]["images"][0]["profile"] == "dsa-test"
    assert out["inputs"]["images"][0]["frame"] == 5  # the fullest frame of the contrast run
    assert chat.batches == [1]


def test_study_with_only_lateral_views_gets_a_result_saying_nothing_was_audited(
    settings: AgentSettings, db: StateDB, clock: Clock
) -> None:
    lat = store(settings, db, "1.2.14.1", view_position="LL")
    job_id = queue(db, "1.2.14.1", clock.now)
    grounder = FakeGrounder.from_rule("mean_brightness")
    worker = make_worker(settings, db, clock, lambda name: Auditor(grounder, None))
    worker.run_once()
    worker.stop()
    assert db.job(job_id).state == "done"  # type: ignore[union-attr]
    out = sidecar(settings, "1.2.14.1")
    assert out["inputs"]["images"] == []
    assert out["inputs"]["skipped_images"] == [{"image_id": lat, "reason": "lateral_view"}]
    assert out["grounding"]["state"] != "ok" and out["flags"] == []
    assert grounder.batch_sizes == []  # the model was not called for nothing


def test_default_factory_finds_site_only_profiles_for_grounder_and_parser(
    settings: AgentSettings, tmp_path: Path
) -> None:
    """Both the grounding profile and the draft parser may live only in ``paths.profiles``."""
    from dicom_agent.config import load_settings
    from dicom_agent.registry import default_auditor_factory

    site = tmp_path / "site-profiles"
    site.mkdir()
    (site / "g.yaml").write_text("name: site-fake\ntask: grounding\nbackend: fake\n")
    (site / "p.yaml").write_text("name: site-rules\ntask: draft_parsing\nbackend: rules\n")
    site_settings = load_settings(
        paths={**settings.paths.model_dump(), "profiles": site},
        drafts={"parser": "site-rules"},
    )
    runner = default_auditor_factory(site_settings)("site-fake")
    assert isinstance(runner, Auditor)
    assert runner.draft_parser is not None and runner.draft_parser.name == "rules"


def test_jobs_parked_for_the_model_drain_after_a_restart_with_a_working_model(
    settings: AgentSettings,
) -> None:
    """Issue 15 bug 1: the first process never loads the model and parks the audit; the
    restarted one loads it on its first try (no retry involved) and must drain the queue."""
    import time

    from dicom_agent.agent import Agent
    from tests.support.agentproc import wait_until

    def unavailable(name: str) -> Auditor:
        raise ModelUnavailable("no weights for google/medgemma here")

    def run_until(agent: Agent, state: JobState, what: str) -> None:
        agent.start()
        try:
            wait_until(lambda: agent.db.job(job_id).state == state.value,  # type: ignore[union-attr]
                       timeout=30, what=what)
        finally:
            agent.stop()

    first = Agent(settings, auditor_factory=unavailable)
    store(settings, first.db, "1.2.15.1", recorded_at=None)
    job_id = queue(first.db, "1.2.15.1", time.time())
    run_until(first, JobState.WAITING_MODEL, "the job to wait for the model")

    grounder = FakeGrounder.from_rule("mean_brightness")
    second = Agent(settings, auditor_factory=lambda name: Auditor(grounder, None))
    run_until(second, JobState.DONE, "the parked job to finish after the restart")
    assert sidecar(settings, "1.2.15.1")["result_version"] == 1


def test_unloading_models_releases_the_draft_parser_too() -> None:
    """The registry closes the whole runner: an LLM draft parser's model or client with it."""
    from cxr_auditor.drafts.rules import RulesDraftParser

    closed: list[str] = []

    class Parser(RulesDraftParser):
        def close(self) -> None:
            closed.append("parser")

    models = Models(lambda name: Auditor(FakeGrounder.from_rule("mean_brightness"), Parser()), 60)
    assert models.get("fake") is not None
    models.lost("fake", "ModelUnavailable: GPU lost")
    assert closed == ["parser"]
    assert models.get("fake") is None  # retry not due yet
    models.close()
    assert closed == ["parser"]
