"""Fixtures of the command tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def isolated_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative default folders land in tmp_path; no site settings leak in."""
    monkeypatch.chdir(tmp_path)
    for key in ("CXR_AGENT_CONFIG", "CXR_AGENT__PATHS__PROFILES", "CXR_AGENT__GROUNDING__PROFILE"):
        monkeypatch.delenv(key, raising=False)
