"""State DB: migrations, draft records, audit-job transitions and their study side effects."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_agent.errors import StateError
from dicom_agent.state import (
    SCHEMA_VERSION,
    DraftOutcome,
    DraftState,
    FinalState,
    JobState,
    StateDB,
    StoreOutcome,
    StudyState,
)

STUDY = "1.2.3.4"


def add_instance(db: StateDB, study: str = STUDY, sop: str = "1.2.3.4.1", now: float = 0.0,
                 accession: str | None = "ACC1") -> None:
    db.record_instance(
        sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=study + ".9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", transfer_syntax_uid=None,
        view_position="PA", body_part="CHEST", accession_number=accession, path=f"/x/{sop}.dcm",
        sha256=sop, size=1, now=now,
    )


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    return StateDB(tmp_path / "state.sqlite3")


class TestInstances:
    def _record(self, db: StateDB, sha: str, now: float, size: int = 1) -> StoreOutcome:
        return db.record_instance(
            sop_instance_uid="1.2.3.4.1", study_instance_uid=STUDY,
            series_instance_uid=STUDY + ".9", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            modality="DX", transfer_syntax_uid=None, view_position="PA", body_part="CHEST",
            accession_number="ACC1", path="/x/1.dcm", sha256=sha, size=size, now=now,
        )

    def test_new_duplicate_and_replaced(self, db: StateDB) -> None:
        assert self._record(db, "aa", now=10.0) is StoreOutcome.NEW
        assert self._record(db, "aa", now=20.0) is StoreOutcome.DUPLICATE
        assert self._record(db, "bb", now=30.0, size=7) is StoreOutcome.REPLACED
        row = db.instance("1.2.3.4.1")
        assert row is not None
        # a replacement updates what the new bytes say and keeps the first arrival time
        assert (row.sha256, row.size, row.received_at, row.updated_at) == ("bb", 7, 10.0, 30.0)
        assert len(db.instances_of_study(STUDY)) == 1


class TestMigrations:
    def test_new_database_reaches_latest_schema(self, db: StateDB) -> None:
        assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION >= 3
        cols = {r["name"] for r in db.query("PRAGMA table_info(jobs)")}
        assert "result_version" in cols
        indexes = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"studies_recent", "studies_state_recent", "jobs_state_updated"} <= indexes

    def test_version_1_database_is_upgraded_in_place(self, tmp_path: Path) -> None:
        from dicom_agent.state import _MIGRATIONS, _split_sql

        path = tmp_path / "old.sqlite3"
        conn = sqlite3.connect(path)
        for stmt in _split_sql(_MIGRATIONS[0]):
            conn.execute(stmt)
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        conn.close()
        db = StateDB(path)
        assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION


class TestDrafts:
    def test_identical_copy_is_a_duplicate_and_a_new_version_supersedes(self, db: StateDB) -> None:
        kw = {"key": "ACC1", "key_kind": "accession", "file_name": "ACC1.txt", "text": "t",
              "author": None}
        first = db.record_draft(sha256="a", now=1, **kw)
        again = db.record_draft(sha256="a", now=2, **kw)
        newer = db.record_draft(sha256="b", now=3, **kw)
        assert first[0] is DraftOutcome.NEW
        assert again == (DraftOutcome.DUPLICATE, first[1])
        assert newer[0] is DraftOutcome.NEW and newer[1] != first[1]
        states = {d.id: d.state for d in db.drafts()}
        assert states == {first[1]: "superseded", newer[1]: "pending"}

    def test_a_new_version_supersedes_unpaired_drafts_only_and_renames_land(
        self, db: StateDB
    ) -> None:
        kw = {"key": "ACC1", "key_kind": "accession", "file_name": "ACC1.txt", "text": "t",
              "author": "dr"}
        _, orphan = db.record_draft(sha256="a", now=1, **kw)
        db.set_draft_state(orphan, DraftState.ORPHAN, 2)
        _, newer = db.record_draft(sha256="b", now=3, **kw)
        assert db.draft(orphan).state == DraftState.SUPERSEDED.value  # type: ignore[union-attr]
        db.pair_draft(newer, STUDY, 4)
        _, newest = db.record_draft(sha256="c", now=5, **kw)
        assert db.draft(newer).state == DraftState.PAIRED.value  # type: ignore[union-attr]
        db.set_draft_file_name(newest, "ACC1.c.txt")
        row = db.draft(newest)
        assert row is not None and (row.file_name, row.author) == ("ACC1.c.txt", "dr")

    def test_an_amended_final_supersedes_a_pending_one_not_a_compared_one(
        self, db: StateDB
    ) -> None:
        kw = {"key": "ACC1", "key_kind": "accession", "file_name": "ACC1.txt", "text": "t"}
        _, pending = db.record_final(sha256="a", now=1, **kw)
        assert db.record_final(sha256="a", now=2, **kw) == (DraftOutcome.DUPLICATE, pending)
        _, compared = db.record_final(sha256="b", now=3, **kw)
        db.record_agreements(compared, STUDY, [], 4)
        _, amended = db.record_final(sha256="c", now=5, **kw)
        db.set_final_file_name(amended, "ACC1.c.txt")
        assert [(f.id, f.state, f.file_name) for f in db.finals()] == [
            (pending, FinalState.SUPERSEDED.value, "ACC1.txt"),
            (compared, FinalState.COMPARED.value, "ACC1.txt"),
            (amended, FinalState.PENDING.value, "ACC1.c.txt"),
        ]

    def test_pairing_by_accession_supersedes_older_drafts_of_the_study(self, db: StateDB) -> None:
        add_instance(db)
        _, by_uid = db.record_draft(key=STUDY, key_kind="study_uid", file_name="a", sha256="1",
                                    text="x", author=None, now=1)
        _, by_acc = db.record_draft(key="ACC1", key_kind="accession", file_name="b", sha256="2",
                                    text="y", author=None, now=2)
        assert db.studies_for_key("ACC1") == [STUDY] == db.studies_for_key(STUDY)
        assert db.studies_for_key("nope") == []
        db.pair_draft(by_uid, STUDY, 3)
        db.pair_draft(by_acc, STUDY, 4)
        current = db.current_draft(STUDY)
        assert current is not None and current.id == by_acc and current.text == "y"
        assert db.draft(by_uid).state == DraftState.SUPERSEDED.value  # type: ignore[union-attr]

    def test_same_text_under_the_other_key_is_not_a_new_version(self, db: StateDB) -> None:
        add_instance(db)
        _, by_acc = db.record_draft(key="ACC1", key_kind="accession", file_name="a", sha256="1",
                                    text="x", author=None, now=1)
        _, by_uid = db.record_draft(key=STUDY, key_kind="study_uid", file_name="b", sha256="1",
                                    text="x", author=None, now=2)
        assert db.pair_draft(by_acc, STUDY, 3) is True
        assert db.pair_draft(by_uid, STUDY, 4) is False
        assert db.current_draft(STUDY).id == by_acc  # type: ignore[union-attr]
        assert db.draft(by_uid).state == "superseded"  # type: ignore[union-attr]

    def test_draft_repr_hides_key_and_text(self, db: StateDB) -> None:
        _, did = db.record_draft(key="ACC-SECRET", key_kind="accession", file_name="ACC-SECRET.txt",
                                 sha256="1", text="SECRET TEXT", author=None, now=1)
        shown = repr(db.draft(did))
        assert "SECRET" not in shown and "[secure]" in shown


class TestAuditJobs:
    def test_versions_increment_and_a_queued_job_is_reused(self, db: StateDB) -> None:
        add_instance(db)
        db.set_study_state(STUDY, StudyState.WAITING_DRAFT, 1, settled_at=1)
        j1 = db.queue_audit(STUDY, None, "image_only", 2)
        j1b = db.queue_audit(STUDY, 7, "draft", 3)
        assert j1b.id == j1.id and j1b.draft_id == 7 and j1b.result_version == 1
        assert db.study(STUDY).state == StudyState.QUEUED.value  # type: ignore[union-attr]
        (claimed,) = db.claim_audit_jobs(8, 4)
        assert claimed.state == "running" and claimed.attempts == 1
        j2 = db.queue_audit(STUDY, 8, "draft_changed", 5)  # j1 is running: a new version
        assert j2.id != j1.id and j2.result_version == 2

    def test_claim_takes_one_job_per_study_and_skips_receiving_and_future(self, db: StateDB) -> None:
        add_instance(db, "1.1", "1.1.1")
        add_instance(db, "1.2", "1.2.1")
        add_instance(db, "1.3", "1.3.1")
        for uid in ("1.1", "1.2", "1.3"):
            db.set_study_state(uid, StudyState.WAITING_DRAFT, 1, settled_at=1)
            db.queue_audit(uid, None, "image_only", 1)
        add_instance(db, "1.2", "1.2.2", now=2)  # late instance: receiving again
        job3 = db.latest_audit_job("1.3")
        assert job3 is not None
        db.transition_job(job3.id, JobState.RUNNING, 2)
        db.transition_job(job3.id, JobState.QUEUED, 2, error="boom", next_attempt_at=100)
        claimed = db.claim_audit_jobs(8, 3)
        assert [j.study_instance_uid for j in claimed] == ["1.1"]
        assert [j.study_instance_uid for j in db.claim_audit_jobs(8, 100)] == ["1.3"]

    def test_done_settles_the_study_with_its_version(self, db: StateDB) -> None:
        add_instance(db)
        db.set_study_state(STUDY, StudyState.WAITING_DRAFT, 1, settled_at=1)
        db.queue_audit(STUDY, None, "image_only", 1)
        (job,) = db.claim_audit_jobs(1, 2)
        db.transition_job(job.id, JobState.DONE, 3)
        study = db.study(STUDY)
        assert study is not None
        assert (study.state, study.result_version) == ("audited", 1)

    def test_dead_marks_the_study_failed_and_keeps_the_error(self, db: StateDB) -> None:
        add_instance(db)
        db.set_study_state(STUDY, StudyState.WAITING_DRAFT, 1, settled_at=1)
        db.queue_audit(STUDY, None, "image_only", 1)
        (job,) = db.claim_audit_jobs(1, 2)
        dead = db.transition_job(job.id, JobState.DEAD, 3, error="OutputError: bad")
        assert dead.last_error == "OutputError: bad"
        assert db.study(STUDY).state == "failed"  # type: ignore[union-attr]

    def test_refused_transition_raises(self, db: StateDB) -> None:
        add_instance(db)
        job = db.queue_audit(STUDY, None, "reaudit", 1)
        with pytest.raises(StateError, match="queued -> done refused"):
            db.transition_job(job.id, JobState.DONE, 2)

    def test_requeue_running_and_move_jobs_use_the_transition_rules(self, db: StateDB) -> None:
        add_instance(db, "1.1", "1.1.1")
        add_instance(db, "1.2", "1.2.1")
        for uid in ("1.1", "1.2"):
            db.set_study_state(uid, StudyState.WAITING_DRAFT, 1, settled_at=1)
            db.queue_audit(uid, None, "image_only", 1)
        db.claim_audit_jobs(1, 2)
        assert db.requeue_running(now=3) == 1
        assert db.move_jobs(JobState.QUEUED, JobState.WAITING_MODEL, 4) == 2
        assert db.claim_audit_jobs(8, 5) == []
        assert db.move_jobs(JobState.WAITING_MODEL, JobState.QUEUED, 6) == 2
        assert len(db.claim_audit_jobs(8, 7)) == 2

    def test_renumber_job_skips_taken_versions(self, db: StateDB) -> None:
        add_instance(db)
        job = db.queue_audit(STUDY, None, "reaudit", 1)
        assert db.renumber_job(job.id, 3, 2) == 3
        assert db.job(job.id).result_version == 3  # type: ignore[union-attr]


def test_a_database_that_fills_up_raises_state_error_and_keeps_working(tmp_path: Path) -> None:
    """A full database is a StateError (the listener answers Out of Resources), not a raw
    sqlite3 error hidden behind a failed ROLLBACK."""
    db = StateDB(tmp_path / "s.sqlite3")
    pages = db.query("PRAGMA page_count")[0][0]
    db.query(f"PRAGMA max_page_count = {pages}")
    big = "x" * 50_000
    with pytest.raises(StateError):
        for i in range(50):
            db.record_instance(
                sop_instance_uid=f"1.2.{i}", study_instance_uid="1.2", series_instance_uid="1.2.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX",
                transfer_syntax_uid=None, view_position="PA", body_part="CHEST",
                accession_number=None, path=big, sha256="h", size=1,
            )
    db.query("PRAGMA max_page_count = 1000000")
    with db.transaction() as conn:  # no transaction left open: the next one starts cleanly
        conn.execute("DELETE FROM instances")
    assert db.query("SELECT COUNT(*) FROM instances")[0][0] == 0


def test_a_paired_draft_stays_current_until_its_new_version_is_paired(tmp_path: Path) -> None:
    """No window without a draft: a job prepared between the new version's arrival and its
    pairing still audits against the old text, never image-only."""
    db = StateDB(tmp_path / "s.sqlite3")
    add_instance(db)
    _, first = db.record_draft(key="ACC1", key_kind="accession", file_name="ACC1.txt",
                               sha256="a", text="old", author=None, now=1)
    assert db.pair_draft(first, STUDY, 2)
    _, second = db.record_draft(key="ACC1", key_kind="accession", file_name="ACC1.txt",
                                sha256="b", text="new", author=None, now=3)
    current = db.current_draft(STUDY)
    assert current is not None and current.id == first
    assert db.pair_draft(second, STUDY, 4)
    current = db.current_draft(STUDY)
    assert current is not None and current.id == second
    assert {d.id: d.state for d in db.drafts()}[first] == "superseded"
