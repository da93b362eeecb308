"""Scheduling rules as pure functions of (row, now, settings), and their application to the DB.

The clock is always passed in: nothing here sleeps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dicom_agent.config import AgentSettings, PairingSettings
from dicom_agent.scheduler import (
    Action,
    Reason,
    decide,
    expired,
    housekeeping,
    is_orphan,
    is_settled,
    pair_drafts,
    schedule_studies,
)
from dicom_agent.state import (
    DraftRow,
    InstanceRow,
    JobRow,
    JobState,
    StateDB,
    StudyRow,
    StudyState,
    retry_delay,
)

PAIRING = PairingSettings(settle_seconds=10, draft_wait_seconds=60, study_wait_seconds=600)


def study(state: StudyState, last: float = 0.0, settled: float | None = None) -> StudyRow:
    return StudyRow("1.2", "A1", state.value, 0.0, last, settled, None, 0, last)


def draft(did: int = 5) -> DraftRow:
    return DraftRow(did, "A1", "accession", "1.2", "A1.txt", "h", "text", None, "paired", 0, 0)


def job(draft_id: int | None, state: JobState = JobState.DONE) -> JobRow:
    return JobRow(1, "audit", "1.2", state.value, 1, 0, None, draft_id, None, 0, 0, 1)


class TestPureRules:
    def test_is_settled_after_quiet_period_only(self) -> None:
        assert not is_settled(100.0, 109.9, 10)
        assert is_settled(100.0, 110.0, 10)

    def test_is_orphan_after_study_wait(self) -> None:
        assert not is_orphan(0, 599, 600)
        assert is_orphan(0, 600, 600)

    @pytest.mark.parametrize(("attempts", "delay"), [(0, 0), (1, 30), (2, 60), (3, 120), (9, 500)])
    def test_retry_delay_doubles_up_to_the_cap(self, attempts: int, delay: float) -> None:
        assert retry_delay(attempts, 30, 500) == delay

    def test_expired_zero_retention_keeps_forever(self) -> None:
        assert not expired(0, 1e12, 0)
        assert expired(0, 86_400 * 2, 1.5)
        assert not expired(0, 86_400, 1.5)


class TestDecide:
    def test_receiving_waits_until_settled(self) -> None:
        assert decide(study(StudyState.RECEIVING, last=100), None, None, 105, PAIRING).action is Action.NOTHING

    def test_settled_without_draft_starts_the_draft_wait(self) -> None:
        d = decide(study(StudyState.RECEIVING, last=100), None, None, 110, PAIRING)
        assert d.action is Action.WAIT_DRAFT

    def test_settled_with_draft_queues(self) -> None:
        d = decide(study(StudyState.RECEIVING, last=100), draft(), None, 110, PAIRING)
        assert (d.action, d.reason) == (Action.QUEUE, Reason.DRAFT)

    def test_late_instance_after_an_audit_requeues_without_waiting_for_a_draft(self) -> None:
        d = decide(study(StudyState.RECEIVING, last=100), None, job(None), 110, PAIRING)
        assert (d.action, d.reason) == (Action.QUEUE, Reason.LATE_INSTANCE)

    def test_late_instance_on_a_study_audited_with_its_draft_says_so(self) -> None:
        d = decide(study(StudyState.RECEIVING, last=100), draft(), job(draft().id), 110, PAIRING)
        assert (d.action, d.reason) == (Action.QUEUE, Reason.LATE_INSTANCE)

    def test_draft_wait_expiry_gives_image_only(self) -> None:
        s = study(StudyState.WAITING_DRAFT, settled=100)
        assert decide(s, None, None, 159, PAIRING).action is Action.NOTHING
        d = decide(s, None, None, 160, PAIRING)
        assert (d.action, d.reason) == (Action.QUEUE, Reason.IMAGE_ONLY)

    def test_wait_policy_never_audits_without_a_draft(self) -> None:
        wait = PAIRING.model_copy(update={"no_draft_policy": "wait"})
        assert decide(study(StudyState.WAITING_DRAFT, settled=0), None, None, 1e9, wait).action is Action.NOTHING

    def test_a_draft_the_latest_audit_did_not_use_reaudits(self) -> None:
        for state in (StudyState.AUDITED, StudyState.FAILED, StudyState.QUEUED):
            d = decide(study(state), draft(6), job(5), 1, PAIRING)
            assert (d.action, d.reason) == (Action.QUEUE, Reason.DRAFT_CHANGED)
            assert decide(study(state), draft(5), job(5), 1, PAIRING).action is Action.NOTHING


def _instance(
    db: StateDB, study_uid: str, sop: str, now: float, accession: str | None = "ACC1",
    path: str | None = None,
) -> None:
    db.record_instance(
        sop_instance_uid=sop, study_instance_uid=study_uid, series_instance_uid=study_uid + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", transfer_syntax_uid=None,
        view_position="PA", body_part="CHEST", accession_number=accession,
        path=path or f"/n/{sop}.dcm", sha256=sop, size=1, now=now,
    )


def _spooled(settings: AgentSettings, db: StateDB, study_uid: str) -> None:
    """One instance of ``study_uid`` recorded at time 0, its file in the spool."""
    f = settings.paths.spool / f"{study_uid}.1.dcm"
    f.write_bytes(b"x")
    _instance(db, study_uid, study_uid + ".1", now=0, accession=None, path=str(f))


class TestScheduleStudies:
    """The rules applied to a real state DB, the clock advanced by hand."""

    @pytest.fixture
    def db(self, tmp_path: Path) -> StateDB:
        return StateDB(tmp_path / "s.sqlite3")

    def _draft(self, db: StateDB, key: str, sha: str, now: float) -> int:
        return db.record_draft(key=key, key_kind="accession", file_name=f"{key}.txt", sha256=sha,
                               text="No acute disease.", author=None, now=now)[1]

    def test_image_only_then_late_draft_gives_version_2(self, db: StateDB) -> None:
        _instance(db, "1.5", "1.5.1", now=0)
        assert schedule_studies(db, 5, PAIRING) == []
        schedule_studies(db, 10, PAIRING)
        assert db.study("1.5").state == "waiting_draft"  # type: ignore[union-attr]
        (j1,) = schedule_studies(db, 70, PAIRING)
        assert (j1.result_version, j1.draft_id) == (1, None)
        db.claim_audit_jobs(1, 71)
        db.transition_job(j1.id, JobState.DONE, 72)
        did = self._draft(db, "ACC1", "x", 80)
        assert pair_drafts(db, 81, PAIRING.study_wait_seconds) == (1, 0)
        (j2,) = schedule_studies(db, 81, PAIRING)
        assert (j2.result_version, j2.draft_id) == (2, did)
        assert schedule_studies(db, 82, PAIRING) == []  # queued already: nothing new

    def test_draft_before_images_pairs_once_the_study_settles(self, db: StateDB) -> None:
        did = self._draft(db, "ACC9", "x", 0)
        assert pair_drafts(db, 1, PAIRING.study_wait_seconds) == (0, 0)
        _instance(db, "1.6", "1.6.1", now=2, accession="ACC9")
        pair_drafts(db, 3, PAIRING.study_wait_seconds)
        assert schedule_studies(db, 5, PAIRING) == []
        (j,) = schedule_studies(db, 12, PAIRING)
        assert j.draft_id == did and db.study("1.6").state == "queued"  # type: ignore[union-attr]

    def test_orphan_is_kept_and_still_pairs_later(self, db: StateDB) -> None:
        did = self._draft(db, "ACC7", "x", 0)
        assert pair_drafts(db, 600, PAIRING.study_wait_seconds) == (0, 1)
        assert db.draft(did).state == "orphan"  # type: ignore[union-attr]
        assert pair_drafts(db, 700, PAIRING.study_wait_seconds) == (0, 0)  # logged once
        _instance(db, "1.7", "1.7.1", now=800, accession="ACC7")
        assert pair_drafts(db, 801, PAIRING.study_wait_seconds) == (1, 0)
        assert db.draft(did).state == "paired"  # type: ignore[union-attr]

    def test_accession_held_by_two_studies_is_refused_and_reported(
        self, db: StateDB, caplog: pytest.LogCaptureFixture
    ) -> None:
        _instance(db, "1.9", "1.9.1", now=0, accession="ACC5")
        _instance(db, "1.10", "1.10.1", now=1, accession="ACC5")
        did = self._draft(db, "ACC5", "x", 2)
        with caplog.at_level(logging.WARNING, logger="dicom_agent.scheduler"):
            assert pair_drafts(db, 3, PAIRING.study_wait_seconds) == (0, 0)
        assert db.draft(did).state == "ambiguous"  # type: ignore[union-attr]
        assert db.current_draft("1.9") is None and db.current_draft("1.10") is None
        (record,) = [r for r in caplog.records if getattr(r, "event", None) == "draft.ambiguous"]
        assert record.count == 2 and "ACC5" not in record.getMessage()  # type: ignore[attr-defined]
        assert pair_drafts(db, 4, PAIRING.study_wait_seconds) == (0, 0)  # reported once
        by_uid = db.record_draft(key="1.10", key_kind="study_uid", file_name="1.10.txt",
                                 sha256="y", text="No acute disease.", author=None, now=5)[1]
        assert pair_drafts(db, 6, PAIRING.study_wait_seconds) == (1, 0)
        assert db.current_draft("1.10").id == by_uid  # type: ignore[union-attr]

    def test_late_instance_while_queued_waits_for_the_study_to_settle_again(self, db: StateDB) -> None:
        self._draft(db, "ACC1", "x", 0)
        _instance(db, "1.8", "1.8.1", now=0)
        pair_drafts(db, 1, 600)
        (j,) = schedule_studies(db, 10, PAIRING)
        _instance(db, "1.8", "1.8.2", now=11)
        assert db.claim_audit_jobs(8, 12) == []  # receiving again: not claimable
        assert schedule_studies(db, 21, PAIRING)[0].id == j.id  # same job, not a new version
        assert [c.id for c in db.claim_audit_jobs(8, 22)] == [j.id]


class TestHousekeeping:
    def test_only_audited_studies_past_retention_lose_spool_and_results(
        self, settings: AgentSettings
    ) -> None:
        s = settings.model_copy(update={"housekeeping": settings.housekeeping.model_copy(
            update={"spool_retention_days": 1, "results_retention_days": 1})})
        db = StateDB(s.paths.state)
        for uid, done in (("1.10", True), ("1.11", False)):
            _spooled(s, db, uid)
            (s.paths.out / uid).mkdir(parents=True)
            db.set_study_state(uid, StudyState.WAITING_DRAFT, 0, settled_at=0)
            job = db.queue_audit(uid, None, "image_only", 0)
            if done:
                db.claim_audit_jobs(8, 0)
                db.transition_job(job.id, JobState.DONE, 0)
        assert housekeeping(db, s, 2 * 86_400) == (1, 1)
        assert not (s.paths.spool / "1.10.1.dcm").exists() and not (s.paths.out / "1.10").exists()
        assert (s.paths.spool / "1.11.1.dcm").exists() and (s.paths.out / "1.11").exists()
        assert db.instances_of_study("1.10") == [] and len(db.instances_of_study("1.11")) == 1

    def test_failed_and_unpaired_studies_and_old_quarantine_expire_on_their_own_clocks(
        self, settings: AgentSettings
    ) -> None:
        s = settings.model_copy(update={"housekeeping": settings.housekeeping.model_copy(
            update={"failed_retention_days": 1, "unpaired_retention_days": 3,
                    "quarantine_retention_days": 1})})
        db = StateDB(s.paths.state)
        for uid, state in (("1.20", StudyState.FAILED), ("1.21", StudyState.WAITING_DRAFT),
                           ("1.22", StudyState.QUEUED)):
            _spooled(s, db, uid)
            db.set_study_state(uid, state, 0, settled_at=0)
        s.paths.quarantine.mkdir(parents=True, exist_ok=True)
        old, new = s.paths.quarantine / "old.bin", s.paths.quarantine / "new.bin"
        for kept, mtime in ((old, 0.0), (new, 2 * 86_400.0)):
            kept.write_bytes(b"junk")
            kept.with_name(kept.stem + ".reason.txt").write_text("reason: test\n")
            os.utime(kept, (mtime, mtime))
        # Day 2: the failed study is past its 1 day, the unpaired one not yet past 3 days.
        assert housekeeping(db, s, 2 * 86_400) == (1, 0)
        assert db.instances_of_study("1.20") == [] and not (s.paths.spool / "1.20.1.dcm").exists()
        assert len(db.instances_of_study("1.21")) == 1
        assert sorted(p.name for p in s.paths.quarantine.iterdir()) == ["new.bin", "new.reason.txt"]
        # Day 4: the unpaired study goes too; a study with an audit queued never does.
        assert housekeeping(db, s, 4 * 86_400) == (1, 0)
        assert db.instances_of_study("1.21") == []
        assert len(db.instances_of_study("1.22")) == 1 and (s.paths.spool / "1.22.1.dcm").exists()

    def test_an_instance_stored_during_housekeeping_is_never_deleted(
        self, settings: AgentSettings
    ) -> None:
        """A late store (new row) between the expiry check and the unlink keeps its file."""
        from dicom_agent import spool as spool_mod

        db = StateDB(settings.paths.state)
        f = settings.paths.spool / "1.12.1.dcm"
        f.write_bytes(b"old")
        db.record_instance(
            sop_instance_uid="1.12.1", study_instance_uid="1.12", series_instance_uid="1.12.2",
            sop_class_uid="1.2", modality="DX", transfer_syntax_uid=None, view_position="PA",
            body_part="CHEST", accession_number=None, path=str(f), sha256="a", size=1, now=0,
        )
        db.set_study_state("1.12", StudyState.AUDITED, 0)
        taken = db.take_expired_instances

        def take_then_a_store_lands(
            study_uid: str, cutoff: float, states: tuple[StudyState, ...]
        ) -> list[InstanceRow]:
            rows = taken(study_uid, cutoff, states)
            f.write_bytes(b"new")  # the same SOP Instance re-sent and acknowledged meanwhile
            db.record_instance(
                sop_instance_uid="1.12.1", study_instance_uid="1.12",
                series_instance_uid="1.12.2", sop_class_uid="1.2", modality="DX",
                transfer_syntax_uid=None, view_position="PA", body_part="CHEST",
                accession_number=None, path=str(f), sha256="b", size=1, now=5,
            )
            return rows

        db.take_expired_instances = take_then_a_store_lands  # type: ignore[method-assign]
        assert spool_mod.expire_study(db, settings.paths.spool, "1.12", 10) == 0
        assert f.read_bytes() == b"new" and db.instance("1.12.1") is not None
        # once the study is quiet and audited again, it expires normally
        db.take_expired_instances = taken  # type: ignore[method-assign]
        db.set_study_state("1.12", StudyState.AUDITED, 6)
        assert spool_mod.expire_study(db, settings.paths.spool, "1.12", 10) == 1
        assert not f.exists()

    def test_a_study_reopened_by_a_late_instance_is_not_expired(
        self, settings: AgentSettings
    ) -> None:
        db = StateDB(settings.paths.state)
        db.record_instance(
            sop_instance_uid="1.13.1", study_instance_uid="1.13", series_instance_uid="1.13.2",
            sop_class_uid="1.2", modality="DX", transfer_syntax_uid=None, view_position="PA",
            body_part="CHEST", accession_number=None, path="/nowhere", sha256="a", size=1, now=0,
        )
        db.set_study_state("1.13", StudyState.AUDITED, 0)
        db.record_instance(  # a late instance: the study is receiving again
            sop_instance_uid="1.13.9", study_instance_uid="1.13", series_instance_uid="1.13.2",
            sop_class_uid="1.2", modality="DX", transfer_syntax_uid=None, view_position="PA",
            body_part="CHEST", accession_number=None, path="/nowhere2", sha256="c", size=1, now=1,
        )
        assert db.take_expired_instances("1.13", 10) == []
        assert len(db.instances_of_study("1.13")) == 2


class TestSchedulerJobs:
    def test_a_failing_interval_job_logs_and_returns(self, caplog: pytest.LogCaptureFixture) -> None:
        from dicom_agent.scheduler import _guarded

        def boom() -> None:
            raise RuntimeError("disk gone")

        with caplog.at_level(logging.ERROR):
            _guarded(boom, "pairing")()  # must not raise
        (record,) = caplog.records
        assert record.event == "scheduler.error" and "pairing" in record.getMessage()  # type: ignore[attr-defined]

    def test_tick_pairs_and_queues_with_the_injected_clock(self, settings: AgentSettings) -> None:
        from dicom_agent.inbox import DraftReader
        from dicom_agent.scheduler import Scheduler

        db = StateDB(settings.paths.state)
        now = {"t": 0.0}
        sched = Scheduler(settings, db, DraftReader(settings, db), clock=lambda: now["t"])
        (settings.paths.drafts / "ACC1.txt").write_text("Normal.")
        sched.poll_drafts()
        now["t"] = settings.drafts.stable_seconds
        sched.poll_drafts()
        _instance(db, "1.20", "1.20.1", now=0)
        assert sched.tick() == []
        now["t"] = settings.pairing.settle_seconds
        (job,) = sched.tick()
        assert job.draft_id == db.current_draft("1.20").id  # type: ignore[union-attr]
        assert not sched.running

    def test_forward_outbox_is_drained_only_when_enabled(
        self, settings: AgentSettings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        from dicom_agent import forward
        from dicom_agent.inbox import DraftReader
        from dicom_agent.scheduler import Scheduler

        db = StateDB(settings.paths.state)
        off = Scheduler(settings, db, DraftReader(settings, db))
        assert off._sched.get_job("forward") is None
        on_settings = settings.model_copy(
            update={"forward": settings.forward.model_copy(update={"enabled": True})})
        calls: list[float] = []
        monkeypatch.setattr(forward, "drain_outbox", lambda db, s, now: calls.append(now) or 2)
        on = Scheduler(on_settings, db, DraftReader(on_settings, db), clock=lambda: 42.0)
        assert on._sched.get_job("forward") is not None
        with caplog.at_level(logging.INFO):
            on.drain_forward()
        assert calls == [42.0]
        assert [r.event for r in caplog.records] == ["sr.forwarded"]  # type: ignore[attr-defined]
