"""Durable agent state in SQLite (WAL): instances, studies, drafts and jobs.

Every row carries explicit states and timestamps. The schema version lives in
``PRAGMA user_version`` and changes only through the numbered migrations in ``_MIGRATIONS``.
``synchronous=FULL`` because a C-STORE is acknowledged only after its row is committed: in WAL
mode NORMAL would let a power loss roll back an acknowledged instance.

Times are UNIX seconds (float). All access goes through one connection guarded by a lock, so
the listener's association threads, the scheduler and the worker can share a ``StateDB``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_agent.errors import StateError


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
]

SCHEMA_VERSION = len(_MIGRATIONS)


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


class StoreOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # identical bytes: no-op
    REPLACED = "replaced"  # different bytes: stored copy replaced, study marked for re-audit


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
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

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
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._conn.execute("ROLLBACK")
                raise StateError(f"state commit failed: {exc}") from exc

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
            if old is None:
                conn.execute(
                    "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                outcome = StoreOutcome.NEW
            else:
                conn.execute(
                    "UPDATE instances SET study_instance_uid=?, series_instance_uid=?,"
                    " sop_class_uid=?, modality=?, transfer_syntax_uid=?, view_position=?,"
                    " body_part=?, path=?, sha256=?, size=?, state=?, updated_at=?"
                    " WHERE sop_instance_uid=?",
                    (
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
                        sop_instance_uid,
                    ),
                )
                outcome = StoreOutcome.REPLACED
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
            cur = conn.execute(
                "UPDATE jobs SET state=?, next_attempt_at=?, updated_at=? WHERE state=?",
                (JobState.QUEUED.value, now, now, JobState.RUNNING.value),
            )
            return cur.rowcount

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

    def counts(self) -> dict[str, dict[str, int]]:
        """Row counts per table and state, for ``status`` and the health endpoint."""
        out: dict[str, dict[str, int]] = {}
        for table in ("instances", "studies", "drafts", "jobs"):
            rows = self.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: r["n"] for r in rows}
        return out


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
