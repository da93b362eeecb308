"""The monitoring loop end to end in one process: a study stored, its draft paired, the real
worker audits it (fake grounder: pneumothorax + effusion on the bright phantom), the signed
final report dropped in the finals folder, the agreement recorded, then shown on the
monitoring page and in /metrics."""

from __future__ import annotations

from starlette.testclient import TestClient

from cxr_auditor.drafts import get_parser
from dicom_agent.finals import Monitor
from tests.dicom_agent.web.conftest import ACCESSION, WebAgent
from tests.dicom_agent.web.test_pages import rows

FINAL = "Left pneumothorax. Small right pleural effusion. Heart size normal."


def test_page_before_any_final(client: TestClient) -> None:
    html = client.get("/monitoring").text
    assert "RESEARCH USE ONLY" in html
    assert "no final report compared yet" in html


def test_final_report_agreement_is_recorded_and_shown(
    client: TestClient, web_agent: WebAgent, audited: str
) -> None:
    settings = web_agent.settings
    monitor = Monitor(settings, web_agent.db, web_agent.metrics, parser=get_parser("rules"))
    settings.paths.finals.mkdir(parents=True, exist_ok=True)
    (settings.paths.finals / f"{ACCESSION}.txt").write_text(FINAL)
    monitor.tick(now=1000.0)
    assert monitor.tick(now=1010.0) == 1

    html = client.get("/monitoring").text
    table = {r.split("</td>")[1].split(">")[-1]: r for r in rows(html, "agreement")}
    # the model found both, the draft (DRAFT) had the effusion but not the pneumothorax
    ptx = table["Pneumothorax"]
    assert "<td>fake</td>" in ptx
    assert ptx.count("1.000 [0.21-1.00] n=1") == 1  # model sensitivity
    assert "0.000 [0.00-0.79] n=1" in ptx  # draft sensitivity
    assert "1.000 [0.21-1.00] n=1" in table["Pleural effusion"]
    assert len(table) == 5
    flags = {r.split("</td>")[1].split(">")[-1]: r for r in rows(html, "flag-confirmation")}
    assert "1.000 [0.21-1.00] n=1" in flags["missing"] and "1.000" in flags["urgent"]
    assert "<th>compared</th><td>1</td>" in html

    metrics = client.get("/metrics").text
    assert 'cxr_agent_monitor_sensitivity{label="pneumothorax",profile="fake",source="model"} 1.0' in metrics
    assert 'cxr_agent_monitor_window_cases{label="cardiomegaly",profile="fake"} 1.0' in metrics
