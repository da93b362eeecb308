"""/healthz, /readyz and /metrics over real agent parts."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from dicom_agent.config import AgentSettings
from tests.dicom_agent.web.conftest import WebAgent


def test_healthz_follows_serving(client: TestClient, web_agent: WebAgent) -> None:
    assert client.get("/healthz").status_code == 200
    web_agent.serving = False
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["serving"] is False


def test_readyz_checks_listener_db_disk_and_reports_the_model(
    client: TestClient, web_agent: WebAgent, settings: AgentSettings
) -> None:
    r = client.get("/readyz")
    body = r.json()
    assert r.status_code == 200 and body["ready"] is True
    assert set(body["checks"]) == {"listener", "state_db", "disk_spool", "disk_out", "disk_state",
                                   "model"}
    assert body["checks"]["model"] == {
        "ok": False, "required": False,
        "reason": f"profile {settings.grounding.profile} not_loaded"}
    settings.health.min_free_bytes = 1 << 60  # more than any disk
    r = client.get("/readyz")
    assert r.status_code == 503
    assert "floor" in r.json()["checks"]["disk_out"]["reason"]
    assert r.json()["checks"]["disk_out"]["ok"] is False
    settings.health.min_free_bytes = 0
    web_agent.serving = False
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["listener"]["ok"] is False


def test_readyz_fails_when_the_state_db_cannot_be_written(
    client: TestClient, web_agent: WebAgent, tmp_path: Path
) -> None:
    from dicom_agent.state import StateDB

    path = tmp_path / "ro.sqlite3"
    StateDB(path).close()
    readonly = StateDB(f"file:{path}?mode=ro")  # the URI form is not a path: opened read-only
    web_agent.db, original = readonly, web_agent.db
    try:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["state_db"]["ok"] is False
    finally:
        web_agent.db = original


def test_metrics_flags_stage_latency_and_listener_counters(
    client: TestClient, web_agent: WebAgent, audited: str, settings: AgentSettings
) -> None:
    text = client.get("/metrics").text
    # the worker counted the audit's flags and its stage timings
    assert 'cxr_agent_flags_total{kind="urgent"} 1.0' in text
    assert 'cxr_agent_flags_total{kind="missing"} 1.0' in text
    assert 'cxr_agent_stage_seconds_count{stage="decode"} 1.0' in text
    assert 'cxr_agent_stage_seconds_count{stage="model"} 1.0' in text
    for name in ("cxr_agent_associations_active", "cxr_agent_associations_rejected_total",
                 "cxr_agent_bytes_received_total"):
        assert name in text
    assert 'cxr_agent_studies{state="audited"} 1.0' in text


def test_observe_result_counts_each_flag_and_strips_the_unit(
    web_agent: WebAgent, tmp_path: Path
) -> None:
    from tests.support.studies import findings_result, make_study

    result = findings_result(make_study(tmp_path / "s"))
    result = result.model_copy(update={"timings": {"grounding_ms": 250.0}})
    web_agent.metrics.observe_result(result)
    text = web_agent.metrics.render().decode()
    kinds = [f.kind.value for f in result.flags]
    assert len(set(kinds)) >= 2
    for kind in set(kinds):
        assert f'cxr_agent_flags_total{{kind="{kind}"}} {float(kinds.count(kind))}' in text
    assert 'cxr_agent_stage_seconds_bucket{le="0.25",stage="grounding"} 1.0' in text
    assert 'cxr_agent_stage_seconds_bucket{le="0.1",stage="grounding"} 0.0' in text


def test_gpu_memory_is_reported_when_torch_runs_on_a_gpu(
    web_agent: WebAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: a stand-in ``torch`` module answers as torch.cuda does with one device."""
    cuda = SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1,
        memory_allocated=lambda index: 3 * 2**30, memory_reserved=lambda index: 4 * 2**30,
    )
    web_agent.metrics.refresh(web_agent.db)
    assert "cxr_agent_gpu_memory_bytes{" not in web_agent.metrics.render().decode()
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    web_agent.metrics.refresh(web_agent.db)
    text = web_agent.metrics.render().decode()
    assert 'cxr_agent_gpu_memory_bytes{device="cuda:0",kind="allocated"} 3.221225472e+09' in text
    assert 'cxr_agent_gpu_memory_bytes{device="cuda:0",kind="reserved"} 4.294967296e+09' in text


def test_with_the_pages_off_only_the_health_endpoints_answer(
    web_agent: WebAgent, settings: AgentSettings
) -> None:
    from dicom_agent.web import create_app

    settings.web.enabled = False
    with TestClient(create_app(web_agent)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        for path in ("/", "/studies", "/queue", "/audit", "/static/style.css"):
            assert client.get(path).status_code == 404, path


def test_the_frequent_counts_read_indexes_not_rows(web_agent: WebAgent) -> None:
    """status, /healthz and /metrics count by state every few seconds under the DB lock: each
    count must walk a state index (no instance rows, no draft texts)."""
    from dicom_agent.state import QUEUE_TABLES

    assert "instances" not in QUEUE_TABLES
    for table in QUEUE_TABLES:
        plan = " ".join(str(r["detail"]) for r in web_agent.db.query(
            f"EXPLAIN QUERY PLAN SELECT state, COUNT(*) AS n FROM {table} GROUP BY state"))
        assert "USING COVERING INDEX" in plan, (table, plan)
    assert set(web_agent.db.counts(QUEUE_TABLES)) == set(QUEUE_TABLES)
