"""The real agent forwarding to bad destinations: one that stalls mid-PDU, one that refuses with
0xA900, an Orthanc that is down and comes back; the good destination behind them is served.

The stalled destination comes first in ``forward.destinations``, so its job is drained first:
before the forwarder had timeouts it blocked the outbox (one scheduler job) for ever and no
other destination received anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.support.agentproc import AgentProcess, make_study, store, wait_until
from tests.support.orthanc import ORTHANC, start_orthanc
from tests.support.stalled_peer import StallingProxy
from tests.support.storescp import Receiver

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed"),
]

_RESULTS_PER_STUDY = 3  # SR, GSPS and SC for a one-image study


def _destination(name: str, port: int, ae_title: str = "RESEARCHPACS") -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port,
            "research": True}


def _jobs(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    rows = agent.db_query("SELECT * FROM jobs WHERE kind = 'forward' ORDER BY id")
    return {json.loads(r["payload"])["destination"]: r for r in rows}


def test_stalled_refusing_and_down_destinations_do_not_hold_the_outbox(tmp_path: Path) -> None:
    upstream = Receiver(free_port()).start()
    stalled = StallingProxy(upstream.port)
    refusing = Receiver(free_port(), status=0xA900).start()
    good = Receiver(free_port()).start()
    orthanc = start_orthanc(tmp_path / "orthanc")
    orthanc_port = orthanc.dicom_port
    orthanc.stop()  # down from the start
    agent = AgentProcess(tmp_path / "agent", {
        "forward": {
            "enabled": True,
            "destinations": [
                _destination("stalled", stalled.port),
                _destination("refusing", refusing.port),
                _destination("orthanc", orthanc_port, ae_title="ORTHANC"),
                _destination("good", good.port),
            ],
            "retry_backoff_seconds": 1, "retry_backoff_max_seconds": 2,
            "acse_timeout_seconds": 3, "dimse_timeout_seconds": 3,
            "network_timeout_seconds": 2, "job_timeout_seconds": 20,
        },
    })
    revived = None
    try:
        agent.start()
        study = make_study(1, accession="FWD01")
        assert store(agent.port, study) == [0x0000]

        wait_until(lambda: len(good.received) >= _RESULTS_PER_STUDY, timeout=120,
                   what="results at the good destination", interval=0.2, alive=agent.check_alive)
        assert stalled.stalled.is_set()  # the stalled peer really held a C-STORE response
        jobs = _jobs(agent)
        assert jobs["good"]["state"] == "done"
        assert (jobs["refusing"]["state"], jobs["refusing"]["attempts"]) == ("dead", 1)
        assert "0xA900" in jobs["refusing"]["last_error"]
        assert jobs["stalled"]["state"] in ("queued", "running")
        assert jobs["orthanc"]["state"] in ("queued", "running")
        assert "association failed" in (jobs["orthanc"]["last_error"] or "")

        # The stalled peer is retried with backoff, never dead-lettered as refused.
        wait_until(lambda: _jobs(agent)["stalled"]["attempts"] >= 2, timeout=60,
                   what="a second attempt at the stalled destination", alive=agent.check_alive)
        assert "no response" in (_jobs(agent)["stalled"]["last_error"] or "")

        # Orthanc comes back on its port: the queued job is delivered by the next retry.
        revived = start_orthanc(tmp_path / "orthanc", dicom_port=orthanc_port)
        uid = str(study[0].StudyInstanceUID)
        wait_until(lambda: len(revived.study_instances(uid)) >= _RESULTS_PER_STUDY, timeout=60,
                   what="results in the revived Orthanc", interval=0.5, alive=agent.check_alive)
        assert _jobs(agent)["orthanc"]["state"] == "done"

        # The refusing PACS is fixed; an operator re-queues its dead job.
        refusing.status = 0x0000
        done = agent.cli("forward", "retry", "--all")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: _jobs(agent)["refusing"]["state"] == "done", timeout=60,
                   what="the re-queued job delivered", alive=agent.check_alive)
        assert len(refusing.received) == 1 + _RESULTS_PER_STUDY  # the refused one, then all
        log = agent.log_text()
        assert str(study[0].SOPInstanceUID) not in log
    finally:
        agent.stop()
        for peer in (stalled, upstream, refusing, good):
            (peer.close if isinstance(peer, StallingProxy) else peer.stop)()
        if revived is not None:
            revived.stop()
