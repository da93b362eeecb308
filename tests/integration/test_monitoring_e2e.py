"""Monitoring against final reports through a real ``cxr-agent serve``: a study arrives over
C-STORE, its draft in the drafts folder, the audit runs (the fake stand-in: pneumothorax on the
patient's left and an effusion on the right of the bright phantom), then the signed final report
lands in the finals folder; the agreement is recorded in the state DB and shown in /metrics and
on the monitoring page. And ``replay`` / ``diff`` on the studies such a ``serve`` spooled."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.support.agentproc import CXR_AGENT, running_agent, store, wait_until
from tests.support.builders import make_cxr

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT = 30.0
OVERRIDES = {"monitoring": {"poll_seconds": 0.2}}


def _drop_final(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{name}.part"  # the reader leaves *.part alone, then a rename
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(folder / name)


def test_study_draft_final_agreement_in_metrics_and_page(tmp_path: Path) -> None:
    uid, accession = generate_uid(), "MON001"
    with running_agent(tmp_path / "agent", OVERRIDES) as agent:
        agent.drop_draft(f"{accession}.txt", "Small right pleural effusion. No pneumothorax.")
        ds = make_cxr(rows=128, cols=112, study_uid=uid, accession=accession,
                      patient_orientation="L\\F")
        assert store(agent.port, [ds]) == [0x0000]
        wait_until(lambda: agent.result(uid), timeout=TIMEOUT, what="the audit",
                   alive=agent.check_alive)

        _drop_final(agent.path("finals"), f"{accession}.txt",
                    "FINDINGS: Small left apical pneumothorax. Right pleural effusion.")

        def agreement() -> list[dict[str, object]] | None:
            rows = agent.db_query("SELECT * FROM agreements ORDER BY label")
            return rows or None

        rows = {r["label"]: r for r in wait_until(agreement, timeout=TIMEOUT,
                                                   what="the agreement rows",
                                                   alive=agent.check_alive)}
        ptx = rows["pneumothorax"]
        assert (ptx["final_present"], ptx["model_present"], ptx["draft_present"]) == (1, 1, 0)
        assert set(str(ptx["flags"]).split(",")) == {"missing", "urgent"}
        assert rows["cardiomegaly"]["final_present"] == 0 and len(rows) == 5
        assert agent.db_query("SELECT state FROM finals") == [{"state": "compared"}]

        def gauge() -> str | None:
            text = agent.metrics()
            return text if "cxr_agent_monitor_sensitivity{" in text else None

        metrics = wait_until(gauge, timeout=TIMEOUT, what="the monitoring gauges")
        assert re.search(r'cxr_agent_monitor_sensitivity\{label="pneumothorax",'
                         r'profile="fake",source="draft"\} 0\.0', metrics)
        assert re.search(r'cxr_agent_monitor_sensitivity\{label="pleural_effusion",'
                         r'profile="fake",source="model"\} 1\.0', metrics)
        page = httpx.get(f"{agent.health_url}/monitoring", timeout=5.0).text
        assert "RESEARCH USE ONLY" in page and "Pneumothorax" in page
        assert "1.000 [0.21-1.00] n=1" in page
        # the final is kept in processed/, nothing is left in the folder
        assert (agent.path("finals") / "processed" / f"{accession}.txt").exists()


def test_replay_of_a_served_study_with_the_same_profile_changes_nothing(tmp_path: Path) -> None:
    """``replay`` beside a running ``serve``, on the studies it spooled and audited: the same
    profile gives the same flags and findings (``diff`` reports no change), and a second study
    whose spool file is gone is reported, not fatal."""
    uids = [generate_uid(), generate_uid()]
    with running_agent(tmp_path / "agent") as agent:
        for n, uid in enumerate(uids):
            agent.drop_draft(f"RPL{n}.txt", "Small right pleural effusion. No pneumothorax.")
            ds = make_cxr(rows=128, cols=112, study_uid=uid, accession=f"RPL{n}",
                          patient_orientation="L\\F")
            assert store(agent.port, [ds]) == [0x0000]
        for uid in uids:
            wait_until(lambda u=uid: agent.result(u), timeout=TIMEOUT, what="the audits",
                       alive=agent.check_alive)
        for path in (agent.path("spool") / uids[1]).rglob("*"):
            if path.is_file():
                path.unlink()
        out = tmp_path / "replayed"
        done = agent.cli("replay", "--profile", "fake", "--out", str(out))
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body["replayed"] == 1 and list(body["failed"]) == [uids[1]]
        diff = subprocess.run([CXR_AGENT, "diff", str(agent.path("out")), str(out)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert diff.returncode == 0, diff.stderr
        summary = json.loads(diff.stdout)
        assert summary["compared"] == 1 and summary["changed"] == 0
        assert summary["only_in_a"] == [uids[1]]
