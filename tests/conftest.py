"""Shared fixtures: free ports, settings pointed at a temporary folder, strict pydicom."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.ports import free_loopback_port

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch/OpenMP thread per xdist worker (set before anything imports torch): with one
    # worker per core, a second thread each only spins against the other worker's. Measured on
    # two cores: the tiny model's training fixture took 118 s instead of 18 s without this.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    """A free TCP port on loopback (each xdist worker asks the OS, so no collisions)."""
    return free_loopback_port()


def var_paths(var: Path) -> dict[str, Path]:
    """The agent's folders (the ``paths`` config section) laid out under ``var``."""
    return {
        "spool": var / "spool",
        "drafts": var / "drafts",
        "out": var / "out",
        "state": var / "state" / "agent.sqlite3",
        "quarantine": var / "quarantine",
        "finals": var / "finals",
    }


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[AgentSettings]:
    """Agent settings whose folders all live under ``tmp_path``; ports are free ones."""
    s = load_settings(
        paths=var_paths(tmp_path / "var"),
        scp={"port": free_port()},
        health={"port": free_port()},
    )
    s.ensure_folders()
    yield s
