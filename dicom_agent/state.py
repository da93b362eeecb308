"""Durable agent state in SQLite (WAL): instances, studies, drafts and jobs.

Every row carries explicit states and timestamps. The schema version lives in
``PRAGMA user_version`` and changes only through the numbered migrations in ``_MIGRATIONS``.
``synchronous=FULL`` because a C-STORE is acknowledged only after its row is committed: in WAL
mode NORMAL would let a power loss roll back an acknowledged instance.

Times are UNIX seconds (float). All access goes through one connection guarded by a lock, so
the listener's association threads, the scheduler and the worker can share a ``StateDB``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_agent.errors import CorruptStateError, StateError


class InstanceState(StrEnum):
    STORED = "stored"  # will be considered for audit
    IGNORED = "ignored"  # stored, never audited (unknown SOP class with unknown_sop_class=ignore)


class StudyState(StrEnum):
    RECEIVING = "receiving"  # instances still arriving (not settled)
    WAITING_DRAFT = "waiting_draft"  # settled, no draft yet, draft wait running
    QUEUED = "queued"  # an audit job exists and is not finished
    AUDITED = "audited"  # latest audit done and current
    FAILED = "failed"  # latest audit job is dead-lettered


class DraftState(StrEnum):
    PENDING = "pending"  # no study paired yet
    PAIRED = "paired"
    ORPHAN = "orphan"  # no study after pairing.study_wait_seconds (still pairs if it arrives)
    SUPERSEDED = "superseded"  # a newer version for the same key arrived
    AMBIGUOUS = "ambiguous"  # its accession number is held by two or more studies: not paired


class FinalState(StrEnum):
    """A signed final report read from the finals folder (monitoring)."""

    PENDING = "pending"  # no audited result of its study yet (or no study)
    COMPARED = "compared"  # its agreement rows are recorded
    SUPERSEDED = "superseded"  # an amended final for the same key replaced it


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING_MODEL = "waiting_model"
    DONE = "done"
    DEAD = "dead"


class JobKind(StrEnum):
    AUDIT = "audit"
    FORWARD = "forward"


_MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        modality TEXT,
        transfer_syntax_uid TEXT,
        view_position TEXT,
        body_part TEXT,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX instances_study ON instances(study_instance_uid);
    CREATE TABLE studies (
        study_instance_uid TEXT PRIMARY KEY,
        accession_number TEXT,
        state TEXT NOT NULL,
        first_instance_at REAL NOT NULL,
        last_instance_at REAL NOT NULL,
        settled_at REAL,
        audit_requested_at REAL,
        result_version INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE INDEX studies_accession ON studies(accession_number);
    CREATE TABLE drafts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        key_kind TEXT NOT NULL,
        study_instance_uid TEXT,
        file_name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        text TEXT NOT NULL,
        author TEXT,
        state TEXT NOT NULL,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX drafts_key ON drafts(key);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        draft_id INTEGER,
        payload TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state, next_attempt_at);
    CREATE INDEX jobs_study ON jobs(study_instance_uid);
    """,
    # 2: the result version an audit job produces is fixed when the job is queued, so a job
    # re-run after a crash rewrites the same version instead of minting a new one.
    """
    ALTER TABLE jobs ADD COLUMN result_version INTEGER;
    CREATE INDEX drafts_study ON drafts(study_instance_uid);
    """,
    # 3: the results browser pages studies newest first by keyset (first_instance_at, UID),
    # with or without a state filter, and counts finished jobs per minute for the last hour;
    # without these a page at 100,000 studies sorts the whole table.
    """
    CREATE INDEX studies_recent ON studies(first_instance_at, study_instance_uid);
    CREATE INDEX studies_state_recent ON studies(state, first_instance_at, study_instance_uid);
    CREATE INDEX jobs_state_updated ON jobs(state, updated_at);
    """,
    # 4: monitoring against signed final reports (finals/ folder): the finals as read, and per
    # study, label and profile how the model's findings, the draft and its flags agreed with
    # the final. NULL model_present / draft_present: grounding not ok / no draft.
    """
    CREATE TABLE finals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        key_kind TEXT NOT NULL,
        study_instance_uid TEXT,
        file_name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        text TEXT NOT NULL,
        state TEXT NOT NULL,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX finals_key ON finals(key, state);
    CREATE TABLE agreements (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        final_id INTEGER NOT NULL,
        study_instance_uid TEXT NOT NULL,
        result_version INTEGER NOT NULL,
        profile TEXT NOT NULL,
        label TEXT NOT NULL,
        final_present INTEGER NOT NULL,
        model_present INTEGER,
        draft_present INTEGER,
        flags TEXT NOT NULL DEFAULT '',
        recorded_at REAL NOT NULL
    );
    CREATE INDEX agreements_window ON agreements(profile, label, id);
    CREATE INDEX agreements_study ON agreements(study_instance_uid);
    """,
    # 5: the latest result of each study in brief (profile, and one row per flag kind), so the
    # results browser filters by flag or profile with the same newest-first keyset paging as
    # migration 3 (flags live in audit.json, which a filter cannot read 100,000 of).
    """
    CREATE TABLE study_results (
        study_instance_uid TEXT PRIMARY KEY,
        result_version INTEGER NOT NULL,
        profile TEXT NOT NULL,
        first_instance_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX study_results_profile
        ON study_results(profile, first_instance_at, study_instance_uid);
    CREATE TABLE study_flags (
        study_instance_uid TEXT NOT NULL,
        kind TEXT NOT NULL,
        first_instance_at REAL NOT NULL,
        PRIMARY KEY (study_instance_uid, kind)
    );
    CREATE INDEX study_flags_recent ON study_flags(kind, first_instance_at, study_instance_uid);
    """,
    # 6: drafts counted by state from an index (status, /healthz and /metrics count them every
    # few seconds; without it each count read every draft's text under the lock: 125 ms at
    # 100,000 drafts).
    """
    CREATE INDEX drafts_state ON drafts(state);
    """,
]

SCHEMA_VERSION = len(_MIGRATIONS)

#: The tables whose counts by state the frequent callers need (:meth:`StateDB.counts`), each
#: counted from an index on its state.
QUEUE_TABLES = ("studies", "drafts", "jobs")


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str | None
    transfer_syntax_uid: str | None
    view_position: str | None
    body_part: str | None
    path: str
    sha256: str
    size: int
    state: str
    received_at: float
    updated_at: float


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    study_instance_uid: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    draft_id: int | None
    payload: str | None
    created_at: float
    updated_at: float
    result_version: int | None = None


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    accession_number: str | None
    state: str
    first_instance_at: float
    last_instance_at: float
    settled_at: float | None
    audit_requested_at: float | None
    result_version: int
    updated_at: float

    def __repr__(self) -> str:  # the accession number is PHI: keep it out of logs/tracebacks
        return f"StudyRow(state={self.state!r}, result_version={self.result_version}, [secure])"


@dataclass(frozen=True)
class DraftRow:
    id: int
    key: str
    key_kind: str
    study_instance_uid: str | None
    file_name: str
    sha256: str
    text: str
    author: str | None
    state: str
    received_at: float
    updated_at: float

    def __repr__(self) -> str:  # key, file name and text can carry PHI
        return f"DraftRow(id={self.id}, state={self.state!r}, [secure])"


@dataclass(frozen=True)
class FinalRow:
    id: int
    key: str
    key_kind: str
    study_instance_uid: str | None
    file_name: str
    sha256: str
    text: str
    state: str
    received_at: float
    updated_at: float

    def __repr__(self) -> str:  # key, file name and text can carry PHI
        return f"FinalRow(id={self.id}, state={self.state!r}, [secure])"


@dataclass(frozen=True)
class AgreementRow:
    """How one label of one audited study agreed with its final report.

    ``model_present`` is None when the grounding was not ok, ``draft_present`` None when the
    study had no parsed draft; ``flags`` are the flag kinds the audit raised on the label.
    """

    final_id: int
    study_instance_uid: str
    result_version: int
    profile: str
    label: str
    final_present: bool
    model_present: bool | None
    draft_present: bool | None
    flags: tuple[str, ...]
    recorded_at: float

    def __repr__(self) -> str:  # the study UID stays out of logs
        return f"AgreementRow(label={self.label!r}, profile={self.profile!r}, [secure])"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AgreementRow:
        def flag(value: object) -> bool | None:
            return None if value is None else bool(value)

        return cls(
            final_id=int(row["final_id"]),
            study_instance_uid=str(row["study_instance_uid"]),
            result_version=int(row["result_version"]),
            profile=str(row["profile"]),
            label=str(row["label"]),
            final_present=bool(row["final_present"]),
            model_present=flag(row["model_present"]),
            draft_present=flag(row["draft_present"]),
            flags=tuple(f for f in str(row["flags"]).split(",") if f),
            recorded_at=float(row["recorded_at"]),
        )


class DraftOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same key, same SHA-256 as the current draft: recorded as a no-op


#: Allowed job transitions (from -> to). ``_transition_job`` is the only writer of jobs.state.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.WAITING_MODEL}),
    JobState.WAITING_MODEL: frozenset({JobState.QUEUED}),
    JobState.RUNNING: frozenset(
        {JobState.DONE, JobState.QUEUED, JobState.DEAD, JobState.WAITING_MODEL}
    ),
    JobState.DONE: frozenset(),
    # Only an operator's ``cxr-agent forward retry`` brings a dead job back (attempts reset).
    JobState.DEAD: frozenset({JobState.QUEUED}),
}


def _state_in(states: tuple[StrEnum, ...] | None) -> tuple[str, tuple[str, ...]]:
    """A ``WHERE state IN (...)`` clause and its parameters; empty for no filter."""
    if not states:
        return "", ()
    return f" WHERE state IN ({','.join('?' * len(states))})", tuple(s.value for s in states)


# What a replacement (same SOP Instance UID, different bytes) overwrites: all but the key and
# received_at.
_INSTANCE_UPDATED_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "modality",
    "transfer_syntax_uid",
    "view_position",
    "body_part",
    "path",
    "sha256",
    "size",
    "state",
    "updated_at",
)


class StoreOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # identical bytes: no-op
    REPLACED = "replaced"  # different bytes: stored copy replaced, study marked for re-audit
    KEPT_FIRST = "kept_first"  # different bytes, scp.overwrite=keep_first: the new copy dropped


class StateDB:
    """Thread-safe access to the agent's SQLite state."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {path}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        try:
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.execute("PRAGMA foreign_keys=ON")
                self._check_integrity()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise CorruptStateError(self.path, str(exc)) from exc
        self._migrate()

    def _check_integrity(self) -> None:
        """``PRAGMA quick_check`` (O(N), no index cross-check): a damaged file fails here, at
        start-up, with advice, instead of mid-store with a raw DatabaseError."""
        rows = self._conn.execute("PRAGMA quick_check(5)").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            raise sqlite3.DatabaseError("; ".join(problems))

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE); commits on success, rolls back on error."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateError(f"state database busy or failing: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                # SQLite may already have rolled back by itself (disk full, I/O error); a second
                # ROLLBACK would then raise and hide the real error.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StateError(f"state database failed: {exc}") from exc
                raise

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, params))
            except sqlite3.Error as exc:
                raise StateError(f"state query failed: {exc}") from exc

    def _migrate(self) -> None:
        with self._lock:
            current = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} has schema {current}, newer than this agent "
                    f"({SCHEMA_VERSION})"
                )
            for number in range(current, SCHEMA_VERSION):
                with self.transaction() as conn:
                    for stmt in _split_sql(_MIGRATIONS[number]):
                        conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {number + 1}")

    # -- instances ----------------------------------------------------------------------------

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        modality: str | None,
        transfer_syntax_uid: str | None,
        view_position: str | None,
        body_part: str | None,
        accession_number: str | None,
        path: str,
        sha256: str,
        size: int,
        state: InstanceState = InstanceState.STORED,
        now: float | None = None,
    ) -> StoreOutcome:
        """Insert or update one instance and touch its study, in one committed transaction."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            old = conn.execute(
                "SELECT sha256 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if old is not None and old["sha256"] == sha256:
                return StoreOutcome.DUPLICATE
            # one upsert for a new and a replaced instance; received_at keeps the first arrival
            conn.execute(
                "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_instance_uid) DO UPDATE SET"
                f" {', '.join(f'{c}=excluded.{c}' for c in _INSTANCE_UPDATED_COLUMNS)}",
                (
                    sop_instance_uid,
                    study_instance_uid,
                    series_instance_uid,
                    sop_class_uid,
                    modality,
                    transfer_syntax_uid,
                    view_position,
                    body_part,
                    path,
                    sha256,
                    size,
                    state.value,
                    now,
                    now,
                ),
            )
            outcome = StoreOutcome.NEW if old is None else StoreOutcome.REPLACED
            self._touch_study(conn, study_instance_uid, accession_number, now)
            return outcome

    @staticmethod
    def _touch_study(
        conn: sqlite3.Connection, study_uid: str, accession: str | None, now: float
    ) -> None:
        row = conn.execute(
            "SELECT state FROM studies WHERE study_instance_uid = ?", (study_uid,)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO studies (study_instance_uid, accession_number, state,"
                " first_instance_at, last_instance_at, updated_at) VALUES (?,?,?,?,?,?)",
                (study_uid, accession, StudyState.RECEIVING.value, now, now, now),
            )
        else:
            # A late instance re-opens the study: it settles again and is re-audited.
            conn.execute(
                "UPDATE studies SET last_instance_at=?, state=?, settled_at=NULL,"
                " accession_number=COALESCE(accession_number, ?), updated_at=?"
                " WHERE study_instance_uid=?",
                (now, StudyState.RECEIVING.value, accession, now, study_uid),
            )

    def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        rows = self.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return InstanceRow(**dict(rows[0])) if rows else None

    def instances_of_study(self, study_uid: str) -> list[InstanceRow]:
        rows = self.query(
            "SELECT * FROM instances WHERE study_instance_uid = ? ORDER BY received_at",
            (study_uid,),
        )
        return [InstanceRow(**dict(r)) for r in rows]

    def known_paths(self) -> set[str]:
        return {r["path"] for r in self.query("SELECT path FROM instances")}

    # -- jobs ---------------------------------------------------------------------------------

    def requeue_running(self, now: float | None = None) -> int:
        """Start-up reconciliation: jobs left ``running`` by a crash go back to ``queued``."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state = ?", (JobState.RUNNING.value,))
            jobs = [JobRow(**dict(r)) for r in rows.fetchall()]
            for job in jobs:
                self._transition_job(conn, job, JobState.QUEUED, now, next_attempt_at=now)
            return len(jobs)

    def job(self, job_id: int) -> JobRow | None:
        rows = self.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRow(**dict(rows[0])) if rows else None

    def jobs(self, state: JobState | None = None, kind: JobKind | None = None) -> list[JobRow]:
        sql, params = "SELECT * FROM jobs WHERE 1=1", []
        if state is not None:
            sql += " AND state = ?"
            params.append(state.value)
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind.value)
        return [JobRow(**dict(r)) for r in self.query(sql + " ORDER BY id", tuple(params))]

    def counts(
        self, tables: tuple[str, ...] = ("instances", "studies", "drafts", "jobs")
    ) -> dict[str, dict[str, int]]:
        """Row counts per table and state. ``status``, ``/healthz`` and ``/metrics`` leave out
        ``instances`` (:data:`QUEUE_TABLES`): its count scans every instance row under the lock
        (270 ms at 200,000 instances), and they run every few seconds."""
        out: dict[str, dict[str, int]] = {}
        for table in tables:
            rows = self.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: r["n"] for r in rows}
        return out

    # -- studies ------------------------------------------------------------------------------

    def study(self, study_uid: str) -> StudyRow | None:
        rows = self.query("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,))
        return StudyRow(**dict(rows[0])) if rows else None

    def studies(self, states: tuple[StudyState, ...] | None = None) -> list[StudyRow]:
        where, params = _state_in(states)
        rows = self.query(f"SELECT * FROM studies{where} ORDER BY first_instance_at", params)
        return [StudyRow(**dict(r)) for r in rows]

    def studies_page(
        self,
        *,
        states: tuple[StudyState, ...] | None = None,
        prefix: str | None = None,
        flag: str | None = None,
        profile: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[StudyRow]:
        """One page of studies, newest first, for the results browser (read-only).

        Keyset paging: ``before`` is the ``(first_instance_at, study_instance_uid)`` of the
        last row of the previous page, so a page costs the same at row 100,000 as at row 1
        (indexes of migrations 3 and 5). ``prefix`` matches the start of the Study Instance UID
        or of the Accession Number (range scans on their indexes, no LIKE). ``flag`` (a flag
        kind) and ``profile`` filter on the latest result recorded by :meth:`record_result`;
        the page then walks that table's index, newest first.
        """
        # The table whose (first_instance_at, study_instance_uid) index orders the page.
        if flag:
            source = "study_flags k JOIN studies s USING (study_instance_uid)"
        elif profile:
            source = "study_results k JOIN studies s USING (study_instance_uid)"
        else:
            source = "studies s"
        key = "k" if flag or profile else "s"
        clauses: list[str] = []
        params: list[Any] = []
        if flag:
            clauses.append("k.kind = ?")
            params.append(flag)
            if profile:
                source += " JOIN study_results r USING (study_instance_uid)"
                clauses.append("r.profile = ?")
                params.append(profile)
        elif profile:
            clauses.append("k.profile = ?")
            params.append(profile)
        if states:
            clauses.append(f"s.state IN ({','.join('?' * len(states))})")
            params += [st.value for st in states]
        if prefix:
            end = prefix + "\U0010ffff"  # above every UTF-8 continuation of the prefix
            clauses.append(
                "((s.study_instance_uid >= ? AND s.study_instance_uid < ?)"
                " OR (s.accession_number >= ? AND s.accession_number < ?))"
            )
            params += [prefix, end, prefix, end]
        if before is not None:
            clauses.append(f"({key}.first_instance_at, {key}.study_instance_uid) < (?, ?)")
            params += list(before)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.query(
            f"SELECT s.* FROM {source}{where}"
            f" ORDER BY {key}.first_instance_at DESC, {key}.study_instance_uid DESC LIMIT ?",
            (*params, limit),
        )
        return [StudyRow(**dict(r)) for r in rows]

    def record_result(
        self, study_uid: str, result_version: int, profile: str, flag_kinds: list[str],
        now: float,
    ) -> None:
        """Keep the brief of a study's latest result (profile, flag kinds) for the browser's
        filters; an older version than the one recorded changes nothing."""
        with self.transaction() as conn:
            study = conn.execute(
                "SELECT first_instance_at FROM studies WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
            current = conn.execute(
                "SELECT result_version FROM study_results WHERE study_instance_uid = ?",
                (study_uid,),
            ).fetchone()
            if study is None or (current is not None and current[0] > result_version):
                return
            first = study["first_instance_at"]
            conn.execute(
                "INSERT INTO study_results VALUES (?,?,?,?,?) ON CONFLICT(study_instance_uid)"
                " DO UPDATE SET result_version=excluded.result_version,"
                " profile=excluded.profile, updated_at=excluded.updated_at",
                (study_uid, result_version, profile, first, now),
            )
            conn.execute("DELETE FROM study_flags WHERE study_instance_uid = ?", (study_uid,))
            conn.executemany(
                "INSERT INTO study_flags VALUES (?,?,?)",
                [(study_uid, kind, first) for kind in sorted(set(flag_kinds))],
            )

    def result_profiles(self) -> list[str]:
        """Profiles that produced a latest result (the browser's profile filter)."""
        return [str(r["profile"]) for r in self.query(
            "SELECT DISTINCT profile FROM study_results ORDER BY profile")]

    def jobs_of_study(self, study_uid: str) -> list[JobRow]:
        """Every job of a study (audit and forward), oldest first: the study page's timeline."""
        rows = self.query(
            "SELECT * FROM jobs WHERE study_instance_uid = ? ORDER BY id", (study_uid,)
        )
        return [JobRow(**dict(r)) for r in rows]

    def drafts_of_study(self, study_uid: str) -> list[DraftRow]:
        """Every draft paired with (or superseded for) a study, oldest first."""
        rows = self.query(
            "SELECT * FROM drafts WHERE study_instance_uid = ? ORDER BY id", (study_uid,)
        )
        return [DraftRow(**dict(r)) for r in rows]

    def recent_jobs(self, state: JobState, limit: int, *, errored: bool = False) -> list[JobRow]:
        """The ``limit`` most recently changed jobs in ``state`` (bounded: never every job);
        ``errored``: only those with a last error (retrying ones, for queued)."""
        rows = self.query(
            "SELECT * FROM jobs WHERE state = ?"
            + (" AND last_error IS NOT NULL" if errored else "")
            + " ORDER BY updated_at DESC LIMIT ?",
            (state.value, limit),
        )
        return [JobRow(**dict(r)) for r in rows]

    def recent_drafts(self, state: DraftState, limit: int) -> list[DraftRow]:
        """The ``limit`` newest drafts in ``state`` (orphan drafts for the browser)."""
        rows = self.query(
            "SELECT * FROM drafts WHERE state = ? ORDER BY id DESC LIMIT ?", (state.value, limit)
        )
        return [DraftRow(**dict(r)) for r in rows]

    def jobs_finished_per_bucket(
        self, since: float, bucket_seconds: float
    ) -> dict[tuple[str, int], int]:
        """Audit jobs done or dead since ``since``, counted per ``(state, bucket index)``."""
        rows = self.query(
            "SELECT state, CAST((updated_at - ?) / ? AS INTEGER) AS bucket, COUNT(*) AS n"
            " FROM jobs WHERE state IN (?, ?) AND updated_at >= ? AND kind = ?"
            " GROUP BY state, bucket",
            (since, bucket_seconds, JobState.DONE.value, JobState.DEAD.value, since,
             JobKind.AUDIT.value),
        )
        return {(r["state"], int(r["bucket"])): int(r["n"]) for r in rows}

    def writable(self) -> bool:
        """True when a write transaction commits (``/readyz``: disk full, read-only, locked)."""
        try:
            with self.transaction() as conn:
                # A real page write (header page to the WAL): BEGIN IMMEDIATE alone succeeds on
                # a full disk. The value written is the one already there.
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
        except StateError:
            return False
        return True

    def set_study_state(
        self, study_uid: str, state: StudyState, now: float, *, settled_at: float | None = None
    ) -> None:
        """Move a study to ``state``; ``settled_at`` is kept unless given."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE studies SET state=?, settled_at=COALESCE(?, settled_at), updated_at=?"
                " WHERE study_instance_uid=?",
                (state.value, settled_at, now, study_uid),
            )

    def studies_for_key(self, key: str) -> list[str]:
        """The studies a draft key names: the one whose Study Instance UID it is, else every
        study holding it as Accession Number (more than one means the key is ambiguous)."""
        rows = self.query(
            "SELECT study_instance_uid FROM studies WHERE study_instance_uid = ?", (key,)
        ) or self.query(
            "SELECT study_instance_uid FROM studies WHERE accession_number = ?"
            " ORDER BY first_instance_at",
            (key,),
        )
        return [str(r["study_instance_uid"]) for r in rows]

    def take_expired_instances(
        self,
        study_uid: str,
        last_instance_before: float,
        states: tuple[StudyState, ...] = (StudyState.AUDITED,),
    ) -> list[InstanceRow]:
        """Delete and return the instance rows of a study in ``states`` quiet since the cutoff.

        Returns nothing when the study left those states or an instance arrived after the
        cutoff (both re-checked inside the transaction, so a late store wins).
        """
        with self.transaction() as conn:
            study = conn.execute(
                "SELECT state, last_instance_at FROM studies WHERE study_instance_uid=?",
                (study_uid,),
            ).fetchone()
            if (
                study is None
                or study["state"] not in {s.value for s in states}
                or study["last_instance_at"] > last_instance_before
            ):
                return []
            rows = conn.execute(
                "SELECT * FROM instances WHERE study_instance_uid=?", (study_uid,)
            ).fetchall()
            conn.execute("DELETE FROM instances WHERE study_instance_uid=?", (study_uid,))
            return [InstanceRow(**dict(r)) for r in rows]

    # -- drafts -------------------------------------------------------------------------------

    def record_draft(
        self,
        *,
        key: str,
        key_kind: str,
        file_name: str,
        sha256: str,
        text: str,
        author: str | None,
        now: float,
    ) -> tuple[DraftOutcome, int]:
        """Record a draft for ``key``; an identical copy of the current one is a no-op.

        A different version supersedes the key's earlier unpaired drafts at once; a paired
        one stays current until :meth:`pair_draft` pairs the new version, so a job prepared in
        between still sees a draft (never a spurious image-only audit).
        """
        return self._record_report_text(
            "drafts",
            {"key": key, "key_kind": key_kind, "file_name": file_name, "sha256": sha256,
             "text": text, "author": author},
            replaced=(DraftState.PENDING, DraftState.ORPHAN),
            now=now,
        )

    def draft(self, draft_id: int) -> DraftRow | None:
        rows = self.query("SELECT * FROM drafts WHERE id = ?", (draft_id,))
        return DraftRow(**dict(rows[0])) if rows else None

    def drafts(self, states: tuple[DraftState, ...] | None = None) -> list[DraftRow]:
        where, params = _state_in(states)
        return [DraftRow(**dict(r)) for r in self.query(f"SELECT * FROM drafts{where} ORDER BY id", params)]

    def current_draft(self, study_uid: str) -> DraftRow | None:
        """The newest paired draft of a study (older ones are superseded)."""
        rows = self.query(
            "SELECT * FROM drafts WHERE study_instance_uid = ? AND state = ?"
            " ORDER BY id DESC LIMIT 1",
            (study_uid, DraftState.PAIRED.value),
        )
        return DraftRow(**dict(rows[0])) if rows else None

    def pair_draft(self, draft_id: int, study_uid: str, now: float) -> bool:
        """Pair a draft with its study; the study's older drafts become superseded.

        Returns False when the study's current draft has the same content (the same text
        sent once by accession number and once by Study UID): the new row is then kept as
        superseded, so no re-audit follows.
        """
        with self.transaction() as conn:
            same = conn.execute(
                "SELECT 1 FROM drafts d JOIN drafts n ON n.id = ? WHERE d.study_instance_uid = ?"
                " AND d.state = ? AND d.id != n.id AND d.sha256 = n.sha256",
                (draft_id, study_uid, DraftState.PAIRED.value),
            ).fetchone()
            if same is not None:
                conn.execute(
                    "UPDATE drafts SET state=?, study_instance_uid=?, updated_at=? WHERE id=?",
                    (DraftState.SUPERSEDED.value, study_uid, now, draft_id),
                )
                return False
            conn.execute(
                "UPDATE drafts SET state=?, updated_at=? WHERE study_instance_uid=? AND id<?"
                " AND state=?",
                (DraftState.SUPERSEDED.value, now, study_uid, draft_id, DraftState.PAIRED.value),
            )
            conn.execute(
                "UPDATE drafts SET state=?, study_instance_uid=?, updated_at=? WHERE id=?",
                (DraftState.PAIRED.value, study_uid, now, draft_id),
            )
            return True

    def set_draft_file_name(self, draft_id: int, file_name: str) -> None:
        """Point a draft row at its file as named in ``processed/`` (after a collision)."""
        self._set_file_name("drafts", draft_id, file_name)

    def _record_report_text(
        self,
        table: str,
        row: dict[str, str | None],
        *,
        replaced: tuple[DraftState, ...] | tuple[FinalState, ...],
        now: float,
    ) -> tuple[DraftOutcome, int]:
        """Insert a report text ``row`` (drafts or finals) as pending unless the key's current
        row has the same SHA-256; rows of the key in ``replaced`` become superseded. Both
        tables spell their pending and superseded states the same."""
        superseded = DraftState.SUPERSEDED.value
        with self.transaction() as conn:
            current = conn.execute(
                f"SELECT id, sha256 FROM {table} WHERE key = ? AND state != ?"
                " ORDER BY id DESC LIMIT 1",
                (row["key"], superseded),
            ).fetchone()
            if current is not None and current["sha256"] == row["sha256"]:
                return DraftOutcome.DUPLICATE, int(current["id"])
            conn.execute(
                f"UPDATE {table} SET state=?, updated_at=? WHERE key=?"
                f" AND state IN ({','.join('?' * len(replaced))})",
                (superseded, now, row["key"], *(s.value for s in replaced)),
            )
            values: dict[str, object] = {
                **row, "state": DraftState.PENDING.value, "received_at": now, "updated_at": now
            }
            cur = conn.execute(
                f"INSERT INTO {table} ({', '.join(values)})"
                f" VALUES ({','.join('?' * len(values))})",
                tuple(values.values()),
            )
            return DraftOutcome.NEW, int(cur.lastrowid or 0)

    def _set_file_name(self, table: str, row_id: int, file_name: str) -> None:
        with self.transaction() as conn:
            conn.execute(f"UPDATE {table} SET file_name=? WHERE id=?", (file_name, row_id))

    def studies_to_schedule(self) -> list[StudyRow]:
        """Studies the scheduler must look at: not yet audited, or paired with a draft that
        their latest audit job did not use."""
        rows = self.query(
            "SELECT s.* FROM studies s WHERE s.state IN (?,?,?) OR EXISTS (SELECT 1 FROM drafts d"
            " WHERE d.study_instance_uid = s.study_instance_uid AND d.state = ? AND d.id !="
            " COALESCE((SELECT j.draft_id FROM jobs j WHERE j.study_instance_uid ="
            " s.study_instance_uid AND j.kind = ? ORDER BY j.id DESC LIMIT 1), -1))"
            " ORDER BY s.first_instance_at",
            (
                StudyState.RECEIVING.value,
                StudyState.WAITING_DRAFT.value,
                StudyState.QUEUED.value,
                DraftState.PAIRED.value,
                JobKind.AUDIT.value,
            ),
        )
        return [StudyRow(**dict(r)) for r in rows]

    def set_draft_state(self, draft_id: int, state: DraftState, now: float) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE drafts SET state=?, updated_at=? WHERE id=?", (state.value, now, draft_id)
            )

    # -- audit jobs ---------------------------------------------------------------------------

    def latest_audit_job(self, study_uid: str) -> JobRow | None:
        rows = self.query(
            "SELECT * FROM jobs WHERE study_instance_uid = ? AND kind = ? ORDER BY id DESC LIMIT 1",
            (study_uid, JobKind.AUDIT.value),
        )
        return JobRow(**dict(rows[0])) if rows else None

    def queue_audit(
        self, study_uid: str, draft_id: int | None, reason: str, now: float
    ) -> JobRow:
        """Queue an audit of a study that produces the next result version.

        If a job for the study is still queued (not started), it is reused and pointed at
        ``draft_id``: it has not run yet, so one run covers both requests.
        """
        with self.transaction() as conn:
            open_row = conn.execute(
                "SELECT * FROM jobs WHERE study_instance_uid=? AND kind=? AND state IN (?,?)"
                " ORDER BY id DESC LIMIT 1",
                (study_uid, JobKind.AUDIT.value, JobState.QUEUED.value,
                 JobState.WAITING_MODEL.value),
            ).fetchone()
            if open_row is not None:
                conn.execute(
                    "UPDATE jobs SET draft_id=?, updated_at=? WHERE id=?",
                    (draft_id, now, open_row["id"]),
                )
                job_id = int(open_row["id"])
            else:
                version = conn.execute(
                    "SELECT MAX(v) FROM (SELECT MAX(result_version) AS v FROM jobs"
                    " WHERE study_instance_uid=? UNION ALL SELECT result_version FROM studies"
                    " WHERE study_instance_uid=?)",
                    (study_uid, study_uid),
                ).fetchone()[0]
                cur = conn.execute(
                    "INSERT INTO jobs (kind, study_instance_uid, state, attempts,"
                    " next_attempt_at, draft_id, payload, created_at, updated_at,"
                    " result_version) VALUES (?,?,?,0,?,?,?,?,?,?)",
                    (JobKind.AUDIT.value, study_uid, JobState.QUEUED.value, now, draft_id,
                     json.dumps({"reason": reason}), now, now, int(version or 0) + 1),
                )
                job_id = int(cur.lastrowid or 0)
            conn.execute(
                "UPDATE studies SET state=?, audit_requested_at=?, updated_at=?"
                " WHERE study_instance_uid=? AND state != ?",
                (StudyState.QUEUED.value, now, now, study_uid, StudyState.RECEIVING.value),
            )
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return JobRow(**dict(row))

    def set_job_draft(self, job_id: int, draft_id: int | None, now: float) -> None:
        """Record the draft a job actually audited (the study's current one when it ran)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET draft_id=?, updated_at=? WHERE id=?", (draft_id, now, job_id)
            )

    def renumber_job(self, job_id: int, at_least: int, now: float) -> int:
        """Give a job a result version no other job of its study holds, at least ``at_least``.

        The job-table half of :func:`dicom_agent.outputs.layout.free_version`, which passes one
        past the highest version folder on disk as ``at_least``.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT study_instance_uid FROM jobs WHERE id=?", (job_id,)
            ).fetchone()
            top = conn.execute(
                "SELECT MAX(result_version) FROM jobs WHERE study_instance_uid=?",
                (row["study_instance_uid"],),
            ).fetchone()[0]
            version = max(at_least, int(top or 0) + 1)
            conn.execute(
                "UPDATE jobs SET result_version=?, updated_at=? WHERE id=?", (version, now, job_id)
            )
            return version

    def claim_audit_jobs(self, limit: int, now: float) -> list[JobRow]:
        """Mark up to ``limit`` ready audit jobs running (one per study) and return them.

        Ready: queued, due (``next_attempt_at <= now``), of a study that is not receiving
        instances (it would be re-audited anyway) and has no job running already.
        """
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT j.* FROM jobs j JOIN studies s USING (study_instance_uid)"
                " WHERE j.kind=? AND j.state=? AND j.next_attempt_at<=? AND s.state!=?"
                " AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.study_instance_uid ="
                " j.study_instance_uid AND r.kind=j.kind AND r.state=?)"
                " ORDER BY j.next_attempt_at, j.id",
                (JobKind.AUDIT.value, JobState.QUEUED.value, now, StudyState.RECEIVING.value,
                 JobState.RUNNING.value),
            ).fetchall()
            claimed: list[JobRow] = []
            studies: set[str] = set()
            for r in rows:
                job = JobRow(**dict(r))
                if job.study_instance_uid in studies:
                    continue
                studies.add(job.study_instance_uid)
                claimed.append(self._transition_job(conn, job, JobState.RUNNING, now))
                if len(claimed) >= limit:
                    break
            return claimed

    def transition_job(
        self,
        job_id: int,
        target: JobState,
        now: float,
        *,
        error: str | None = None,
        next_attempt_at: float | None = None,
    ) -> JobRow:
        """Apply one job transition (see :data:`JOB_TRANSITIONS`) and its study side effects."""
        with self.transaction() as conn:
            return self._transition_job(
                conn, self._job_for_update(conn, job_id), target, now, error=error,
                next_attempt_at=next_attempt_at,
            )

    def fail_job(
        self,
        job_id: int,
        now: float,
        error: str,
        *,
        max_attempts: int,
        backoff_seconds: float,
        backoff_max_seconds: float,
        permanent: bool = False,
    ) -> JobRow:
        """Record a failed attempt of a running job: back to the queue after the backoff of
        :func:`retry_delay`, or dead once ``max_attempts`` are used or the failure is
        ``permanent`` (retrying cannot help). The one retry-or-dead-letter rule of audit and
        forward jobs; the returned row's state says which happened."""
        with self.transaction() as conn:
            job = self._job_for_update(conn, job_id)
            if permanent or job.attempts >= max_attempts:
                return self._transition_job(conn, job, JobState.DEAD, now, error=error)
            delay = retry_delay(job.attempts, backoff_seconds, backoff_max_seconds)
            return self._transition_job(
                conn, job, JobState.QUEUED, now, error=error, next_attempt_at=now + delay
            )

    # -- forward jobs (the outbox) ------------------------------------------------------------

    def queue_forward_jobs(self, study_uid: str, payloads: list[str], now: float) -> list[int]:
        """Queue one forward job per payload (JSON: destination and files); returns their ids."""
        ids: list[int] = []
        with self.transaction() as conn:
            for payload in payloads:
                cur = conn.execute(
                    "INSERT INTO jobs (kind, study_instance_uid, state, attempts, next_attempt_at,"
                    " payload, created_at, updated_at) VALUES (?,?,?,0,?,?,?,?)",
                    (JobKind.FORWARD.value, study_uid, JobState.QUEUED.value, now, payload, now,
                     now),
                )
                ids.append(int(cur.lastrowid or 0))
        return ids

    def due_forward_jobs(self, now: float) -> list[JobRow]:
        """Queued forward jobs whose next attempt is due at ``now``, oldest first."""
        rows = self.query(
            "SELECT * FROM jobs WHERE kind=? AND state=? AND next_attempt_at<=? ORDER BY id",
            (JobKind.FORWARD.value, JobState.QUEUED.value, now),
        )
        return [JobRow(**dict(r)) for r in rows]

    def retry_dead_forward_jobs(self, job_ids: list[int] | None, now: float) -> list[JobRow]:
        """Re-queue dead forward jobs (all of them when ``job_ids`` is None), due now and with a
        fresh attempt budget. An id that is no dead forward job raises StateError and nothing
        is re-queued."""
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE kind=? AND state=? ORDER BY id",
                (JobKind.FORWARD.value, JobState.DEAD.value),
            ).fetchall()
            dead = {int(r["id"]): JobRow(**dict(r)) for r in rows}
            wanted = sorted(dead) if job_ids is None else job_ids
            missing = [i for i in wanted if i not in dead]
            if missing:
                raise StateError(
                    f"not dead forward jobs: {', '.join(str(i) for i in missing)}"
                )
            return [
                self._transition_job(conn, dead[i], JobState.QUEUED, now, next_attempt_at=now)
                for i in wanted
            ]

    # -- finals and agreements (monitoring) ---------------------------------------------------

    def record_final(
        self, *, key: str, key_kind: str, file_name: str, sha256: str, text: str, now: float
    ) -> tuple[DraftOutcome, int]:
        """Record a final report for ``key``; the same bytes as the key's current one are a
        no-op. An amended final leaves the compared one current until it is compared itself."""
        return self._record_report_text(
            "finals",
            {"key": key, "key_kind": key_kind, "file_name": file_name, "sha256": sha256,
             "text": text},
            replaced=(FinalState.PENDING,),
            now=now,
        )

    def finals_counts(self) -> dict[str, int]:
        """Final reports by state (every state present, 0 when none)."""
        counts = self.counts(("finals",))["finals"]
        return {s.value: int(counts.get(s.value, 0)) for s in FinalState}

    def set_final_file_name(self, final_id: int, file_name: str) -> None:
        """Point a final's row at its file as named in ``processed/`` (after a collision)."""
        self._set_file_name("finals", final_id, file_name)

    def finals(self, state: FinalState | None = None) -> list[FinalRow]:
        where, params = _state_in((state,) if state else None)
        rows = self.query(f"SELECT * FROM finals{where} ORDER BY id", params)
        return [FinalRow(**dict(r)) for r in rows]

    def record_agreements(
        self, final_id: int, study_uid: str, rows: list[AgreementRow], now: float
    ) -> None:
        """Replace the study's agreement rows with those of ``final_id`` and mark it compared
        (an earlier compared final of the study becomes superseded), in one transaction."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM agreements WHERE study_instance_uid=?", (study_uid,))
            conn.executemany(
                "INSERT INTO agreements (final_id, study_instance_uid, result_version, profile,"
                " label, final_present, model_present, draft_present, flags, recorded_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (r.final_id, r.study_instance_uid, r.result_version, r.profile, r.label,
                     int(r.final_present),
                     None if r.model_present is None else int(r.model_present),
                     None if r.draft_present is None else int(r.draft_present),
                     ",".join(r.flags), r.recorded_at)
                    for r in rows
                ],
            )
            conn.execute(
                "UPDATE finals SET state=?, updated_at=? WHERE study_instance_uid=? AND state=?"
                " AND id!=?",
                (FinalState.SUPERSEDED.value, now, study_uid, FinalState.COMPARED.value, final_id),
            )
            conn.execute(
                "UPDATE finals SET state=?, study_instance_uid=?, updated_at=? WHERE id=?",
                (FinalState.COMPARED.value, study_uid, now, final_id),
            )

    def agreement_window(self, per_label: int) -> list[AgreementRow]:
        """The newest ``per_label`` agreement rows of every (profile, label): the sliding
        window of the running sensitivity and specificity."""
        rows = self.query(
            "SELECT * FROM (SELECT a.*, ROW_NUMBER() OVER (PARTITION BY profile, label"
            " ORDER BY id DESC) AS rn FROM agreements a) WHERE rn <= ? ORDER BY id",
            (per_label,),
        )
        return [AgreementRow.from_row(r) for r in rows]

    def move_jobs(self, source: JobState, target: JobState, now: float) -> int:
        """Move every audit job in ``source`` to ``target`` (waiting for / regaining the model)."""
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state=? AND kind=?", (source.value, JobKind.AUDIT.value)
            ).fetchall()
            for r in rows:
                self._transition_job(conn, JobRow(**dict(r)), target, now, next_attempt_at=now)
            return len(rows)

    @staticmethod
    def _job_for_update(conn: sqlite3.Connection, job_id: int) -> JobRow:
        """The job's row read inside the caller's transaction; StateError when there is none."""
        row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise StateError(f"job {job_id} does not exist")
        return JobRow(**dict(row))

    @staticmethod
    def _transition_job(
        conn: sqlite3.Connection,
        job: JobRow,
        target: JobState,
        now: float,
        *,
        error: str | None = None,
        next_attempt_at: float | None = None,
    ) -> JobRow:
        """The only writer of ``jobs.state``.

        Starting a job counts an attempt (so a job that crashes the process is still
        dead-lettered eventually). A finished or dead audit settles its study unless another
        audit of that study is still open or new instances re-opened it.
        """
        source = JobState(job.state)
        if target not in JOB_TRANSITIONS[source]:
            raise StateError(f"job {job.id}: transition {source.value} -> {target.value} refused")
        if source is JobState.DEAD:
            attempts = 0  # re-queued by an operator: a fresh attempt budget
        else:
            attempts = job.attempts + 1 if target is JobState.RUNNING else job.attempts
        conn.execute(
            "UPDATE jobs SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=?"
            " WHERE id=?",
            (
                target.value,
                attempts,
                job.next_attempt_at if next_attempt_at is None else next_attempt_at,
                error if error is not None else job.last_error,
                now,
                job.id,
            ),
        )
        if job.kind == JobKind.AUDIT.value and target in (JobState.DONE, JobState.DEAD):
            others = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE study_instance_uid=? AND kind=? AND id!=?"
                " AND state IN (?,?,?)",
                (job.study_instance_uid, job.kind, job.id, JobState.QUEUED.value,
                 JobState.RUNNING.value, JobState.WAITING_MODEL.value),
            ).fetchone()[0]
            study_state = StudyState.AUDITED if target is JobState.DONE else StudyState.FAILED
            if target is JobState.DONE:
                conn.execute(
                    "UPDATE studies SET result_version=MAX(result_version, ?), updated_at=?"
                    " WHERE study_instance_uid=?",
                    (job.result_version or 0, now, job.study_instance_uid),
                )
            if not others:
                conn.execute(
                    "UPDATE studies SET state=?, updated_at=? WHERE study_instance_uid=?"
                    " AND state=?",
                    (study_state.value, now, job.study_instance_uid, StudyState.QUEUED.value),
                )
        row = conn.execute("SELECT * FROM jobs WHERE id=?", (job.id,)).fetchone()
        return JobRow(**dict(row))


def retry_delay(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Backoff (audit and forward jobs alike) before the next attempt after ``attempts`` failed ones: base, 2*base, 4*base..."""
    if attempts < 1:
        return 0.0
    return float(min(base_seconds * 2 ** (attempts - 1), max_seconds))


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
