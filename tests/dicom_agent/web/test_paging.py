"""Keyset paging at 100,000 studies: a deep page costs what the first one costs.

Proved without a clock: SQLite's query plan walks an index in order (no sort of the table),
and the number of virtual-machine steps a page takes is counted with a progress handler. The
wall times are printed (``-s``) for docs/browser.md.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from dicom_agent.state import StateDB, StudyState
from dicom_agent.web.studies import encode_cursor
from tests.dicom_agent.web.conftest import WebAgent

N = 100_000
STATES = [s.value for s in StudyState]


@pytest.fixture
def many(web_agent: WebAgent) -> StateDB:
    db = web_agent.db
    rows = [
        (f"1.2.826.0.1.3680043.8.498.{i}", f"ACC{i:06d}", STATES[i % len(STATES)], 1e9 + i,
         1e9 + i, 1e9 + i)
        for i in range(N)
    ]
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO studies (study_instance_uid, accession_number, state,"
            " first_instance_at, last_instance_at, updated_at) VALUES (?,?,?,?,?,?)",
            rows,
        )
    return db


def measured(db: StateDB, call: Callable[[], Any]) -> tuple[Any, int, list[str], float]:
    """(result, VM steps / 100, the SQL run, seconds) of one call."""
    steps = [0]
    statements: list[str] = []
    conn: sqlite3.Connection = db._conn  # the test looks under the hood on purpose

    def count() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, 100)
    conn.set_trace_callback(statements.append)
    start = time.perf_counter()
    try:
        result = call()
    finally:
        conn.set_progress_handler(None, 100)
        conn.set_trace_callback(None)
    return result, steps[0], statements, time.perf_counter() - start


def plan(db: StateDB, sql: str) -> str:
    return " | ".join(str(r["detail"]) for r in db.query("EXPLAIN QUERY PLAN " + sql))


@pytest.fixture
def flagged(many: StateDB) -> StateDB:
    """Every 50th study's latest result has an URGENT flag; every one has profile ``fake``."""
    with many.transaction() as conn:
        conn.executemany(
            "INSERT INTO study_results VALUES (?,?,?,?,?)",
            [(f"1.2.826.0.1.3680043.8.498.{i}", 1, "fake", 1e9 + i, 1e9 + i) for i in range(N)],
        )
        conn.executemany(
            "INSERT INTO study_flags VALUES (?,?,?)",
            [(f"1.2.826.0.1.3680043.8.498.{i}", "urgent", 1e9 + i) for i in range(0, N, 50)],
        )
    return many


@pytest.mark.parametrize(("flag", "profile"), [("urgent", None), (None, "fake")])
def test_flag_and_profile_filters_page_by_their_index(
    flagged: StateDB, flag: str | None, profile: str | None
) -> None:
    first, first_steps, (sql,), first_s = measured(
        flagged, lambda: flagged.studies_page(flag=flag, profile=profile, limit=50))
    assert len(first) == 50
    query_plan = plan(flagged, sql)
    assert "TEMP B-TREE" not in query_plan
    assert ("study_flags_recent" if flag else "study_results_profile") in query_plan
    last = first[-1]
    cursor = (last.first_instance_at, last.study_instance_uid)
    for _ in range(30):  # walk 30 pages deep, then measure one more
        page = flagged.studies_page(flag=flag, profile=profile, before=cursor, limit=50)
        cursor = (page[-1].first_instance_at, page[-1].study_instance_uid)
    deep, deep_steps, _, deep_s = measured(
        flagged, lambda: flagged.studies_page(flag=flag, profile=profile, before=cursor, limit=50))
    assert len(deep) == 50 and deep[0].first_instance_at < cursor[0]
    assert deep_steps <= 2 * first_steps + 2
    print(f"\n{N} studies, flag {flag} profile {profile}: first page {first_s * 1000:.2f} ms"
          f" ({first_steps * 100} VM steps), page 32 {deep_s * 1000:.2f} ms"
          f" ({deep_steps * 100} VM steps)")


@pytest.mark.parametrize("states", [None, (StudyState.AUDITED,)])
def test_a_deep_page_costs_what_the_first_page_costs(
    many: StateDB, states: tuple[StudyState, ...] | None
) -> None:
    first, first_steps, (sql,), first_s = measured(
        many, lambda: many.studies_page(states=states, limit=50))
    newest = max(i for i in range(N) if states is None or STATES[i % len(STATES)] == "audited")
    assert len(first) == 50 and first[0].first_instance_at == 1e9 + newest
    query_plan = plan(many, sql)
    assert "TEMP B-TREE" not in query_plan  # walks the index in order, never sorts the table
    assert "studies_recent" in query_plan or "studies_state_recent" in query_plan

    # the page after 99,000 rows (a cursor near the end)
    deep_row = many.studies_page(states=states, limit=1,
                                 before=(1e9 + 1000, "1.2.826.0.1.3680043.8.498.1000"))[0]
    cursor = (deep_row.first_instance_at, deep_row.study_instance_uid)
    deep, deep_steps, (deep_sql,), deep_s = measured(
        many, lambda: many.studies_page(states=states, before=cursor, limit=50))
    assert len(deep) == 50 and deep[0].first_instance_at < cursor[0]
    assert "TEMP B-TREE" not in plan(many, deep_sql)
    assert deep_steps <= 2 * first_steps + 2
    print(f"\n{N} studies, filter {states}: first page {first_s * 1000:.2f} ms"
          f" ({first_steps * 100} VM steps), page after ~99,000 rows {deep_s * 1000:.2f} ms"
          f" ({deep_steps * 100} VM steps)")


def test_prefix_search_uses_the_uid_and_accession_indexes(many: StateDB) -> None:
    found, steps, (sql,), seconds = measured(
        many, lambda: many.studies_page(prefix="ACC09999", limit=50))
    assert sorted(s.accession_number for s in found) == [f"ACC09999{i}" for i in range(10)]
    query_plan = plan(many, sql)
    assert "SCAN studies" not in query_plan.replace("SCAN studies USING", "")  # no full scan
    by_uid, _, _, _ = measured(
        many, lambda: many.studies_page(prefix="1.2.826.0.1.3680043.8.498.4242", limit=50))
    assert {s.study_instance_uid for s in by_uid} >= {"1.2.826.0.1.3680043.8.498.42421"}
    print(f"\nprefix search over {N} studies: {seconds * 1000:.2f} ms ({steps * 100} VM steps)")


def test_the_list_page_at_100k(client: TestClient, many: StateDB) -> None:
    start = time.perf_counter()
    html = client.get("/studies").text
    first_s = time.perf_counter() - start
    assert html.count('class="study-link"') == 50
    row = many.studies_page(limit=1, before=(1e9 + 500, "x"))[0]
    start = time.perf_counter()
    deep = client.get("/studies", params={"after": encode_cursor(row)}).text
    deep_s = time.perf_counter() - start
    assert deep.count('class="study-link"') == 50 and "ACC000499" in deep
    print(f"\n/studies with {N} studies: first page {first_s * 1000:.0f} ms,"
          f" page after 99,500 rows {deep_s * 1000:.0f} ms (TestClient, no audit.json files)")


@pytest.mark.slow
def test_status_counts_at_100k_studies(many: StateDB) -> None:
    """The heartbeat's counts (every 2 s) with 200,000 instances and 100,000 drafts and jobs:
    printed for docs/browser.md; asserted without a clock (only QUEUE_TABLES are counted)."""
    from dicom_agent.agent import status_counts

    with many.transaction() as conn:
        conn.executemany(
            "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(f"1.3.{i}.{k}", f"1.2.826.0.1.3680043.8.498.{i}", "1.4", "1.2.840.10008.5.1.4.1.1.1.1",
              "DX", "1.2.840.10008.1.2.1", "PA", "CHEST", f"/spool/{i}/{k}.dcm", "ab" * 32,
              10_000_000, "stored", 1e9 + i, 1e9 + i) for i in range(N) for k in range(2)],
        )
        conn.executemany(
            "INSERT INTO jobs (kind, study_instance_uid, state, attempts, next_attempt_at,"
            " created_at, updated_at, result_version) VALUES ('audit', ?, 'done', 1, ?, ?, ?, 1)",
            [(f"1.2.826.0.1.3680043.8.498.{i}", 1e9 + i, 1e9 + i, 1e9 + i) for i in range(N)],
        )
        conn.executemany(
            "INSERT INTO drafts (key, key_kind, study_instance_uid, file_name, sha256, text,"
            " state, received_at, updated_at) VALUES (?, 'accession', ?, ?, 'x', ?, 'paired',"
            " ?, ?)",
            [(f"ACC{i:06d}", f"1.2.826.0.1.3680043.8.498.{i}", f"ACC{i:06d}.txt",
              "Small right pleural effusion. No pneumothorax. " * 4, 1e9 + i, 1e9 + i)
             for i in range(N)],
        )
    statements: list[str] = []
    many._conn.set_trace_callback(statements.append)
    start = time.perf_counter()
    try:
        body = status_counts(many)
    finally:
        many._conn.set_trace_callback(None)
    seconds = time.perf_counter() - start
    assert body["jobs"]["done"] == N and body["drafts"]["paired"] == N
    assert not any("FROM instances" in sql for sql in statements)
    start = time.perf_counter()
    many.counts(("instances",))
    instances_s = time.perf_counter() - start
    print(f"\nstatus_counts at {N} studies, {2 * N} instances, {N} drafts and jobs:"
          f" {seconds * 1000:.0f} ms (counting instances too would add {instances_s * 1000:.0f} ms)")
