"""``cxr-agent serve`` start-up refuses early and clearly: a taken port, a second agent, a typo.

Each case starts the real console script and reads what it printed and what it left on disk.
"Before any state work" is checked on disk: a refused start creates no state database, and a
second agent on the same folders leaves the first one's temp files and running jobs alone.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, running_agent

pytestmark = pytest.mark.integration

REFUSE_TIMEOUT = 60.0  # a refused start exits by itself; this only bounds a hang


def run_refused(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` with the agent's config and expect it to exit by itself."""
    agent.write_config()
    done = agent.cli("serve", timeout=REFUSE_TIMEOUT)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    return done


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """Another program's listening socket on a loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock
    sock.close()


def test_taken_dicom_port_fails_before_any_state_work(tmp_path: Path, listening: socket.socket) -> None:
    agent = AgentProcess(tmp_path)
    agent.config["scp"]["port"] = listening.getsockname()[1]
    done = run_refused(agent)
    assert "scp.port" in done.stderr and "CXR_AGENT__SCP__PORT" in done.stderr
    assert "already in use" in done.stderr
    assert not Path(agent.config["paths"]["state"]).exists()  # no DB opened, nothing reconciled
    assert "agent serving" not in done.stdout + done.stderr


def test_taken_health_port_fails_before_any_state_work(tmp_path: Path, listening: socket.socket) -> None:
    agent = AgentProcess(tmp_path)
    agent.config["health"]["port"] = listening.getsockname()[1]
    done = run_refused(agent)
    assert "health.port" in done.stderr and "CXR_AGENT__HEALTH__PORT" in done.stderr
    assert not Path(agent.config["paths"]["state"]).exists()


def test_unknown_profile_fails_at_start_with_the_known_names(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)
    agent.config["grounding"] = {"profile": "fak"}
    done = run_refused(agent)
    assert "grounding.profile: unknown profile 'fak'" in done.stderr
    known = done.stderr.split("known profiles:")[1]
    assert "fake" in known and "cxr-auditor-v2" in known
    assert not Path(agent.config["paths"]["state"]).exists()


def test_second_serve_on_the_same_folders_touches_nothing(tmp_path: Path) -> None:
    with running_agent(tmp_path / "first") as first:
        # What a live agent has in flight: an output being written and a job being run.
        temp = first.path("out") / "study" / ".audit.json.abc123.tmp"
        temp.parent.mkdir(parents=True)
        temp.write_text("{}", encoding="utf-8")
        conn = sqlite3.connect(first.config["paths"]["state"], timeout=10)
        try:
            conn.execute(
                "INSERT INTO jobs (kind, study_instance_uid, state, next_attempt_at, created_at,"
                " updated_at) VALUES ('audit', '1.2.3', 'running', 0, 0, 0)"
            )
            conn.commit()
        finally:
            conn.close()

        second = AgentProcess(tmp_path / "second")  # its own free ports, the first one's folders
        second.config["paths"] = first.config["paths"]
        done = run_refused(second)
        assert "another cxr-agent" in done.stderr
        assert f"pid {first.pid}" in done.stderr
        assert "agent.lock" in done.stderr
        assert temp.exists()
        assert [r["state"] for r in first.db_query("SELECT state FROM jobs WHERE study_instance_uid = '1.2.3'")] == [
            "running"
        ]
        assert first.healthz() is not None  # the first one still serves
