"""``cxr-agent doctor`` checks the ports ``serve`` will bind (issue 16: doctor checks ports)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from dicom_agent.cli import app
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fake_profile(isolated_cli: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_AGENT__GROUNDING__PROFILE", "fake")


def port_lines(output: str) -> dict[str, str]:
    return {line.split()[2]: line for line in output.splitlines() if line[5:].startswith("port ")}


def test_free_taken_and_unbindable_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    scp_port = free_port()
    monkeypatch.setenv("CXR_AGENT__SCP__PORT", str(scp_port))
    with socket.socket() as holder:  # the HTTP port is taken by another program
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setenv("CXR_AGENT__HEALTH__PORT", str(holder.getsockname()[1]))
        lines = port_lines(runner.invoke(app, ["doctor"]).output)
    assert lines["scp.port"].startswith("ok") and lines["scp.port"].endswith("free")
    assert lines["health.port"].startswith("warn") and "in use" in lines["health.port"]

    monkeypatch.setenv("CXR_AGENT__SCP__HOST", "192.0.2.1")  # TEST-NET-1: never this machine
    result = runner.invoke(app, ["doctor"])
    assert port_lines(result.output)["scp.port"].startswith("FAIL")
    assert "cannot bind" in port_lines(result.output)["scp.port"]
    assert result.exit_code == 1


def test_the_http_port_is_not_checked_when_the_server_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CXR_AGENT__HEALTH__ENABLED", "false")
    assert "health.port" not in port_lines(runner.invoke(app, ["doctor"]).output)
