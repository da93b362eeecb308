"""scripts/setup.sh and scripts/run.sh, run for real in a copy of the scripts with a recording pip.

The copy has a ``.venv`` whose ``pip`` only writes its arguments to a file, so what each flag
installs is read back without a download (no index is reachable from the test machines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The scripts and pyproject.toml in a temp root, with a recording .venv/bin/pip and a
    .venv/bin/cxr-agent that echoes its arguments."""
    (tmp_path / "scripts").mkdir()
    for name in ("setup.sh", "run.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    for tool in ("pip", "cxr-agent"):
        (venv / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "$(dirname "$0")/../calls.txt"\n')
        (venv / tool).chmod(0o755)
    return tmp_path


def run(copy: Path, script: str, *args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"CXR_GPU", "CXR_CUDA"}}
    done = subprocess.run(["bash", f"scripts/{script}", *args], cwd=copy, env={**clean, **env},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    calls = copy / ".venv" / "calls.txt"
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return lines


def test_setup_without_flags_is_the_cpu_path_ci_uses(copy: Path) -> None:
    calls = run(copy, "setup.sh")
    assert "pip install -q torch==2.13.0" in calls
    assert not any("download.pytorch.org" in c or "bitsandbytes" in c for c in calls)
    assert run(copy, "setup.sh") == []  # idempotent: the stamp skips a second install


@pytest.mark.parametrize("how", ["flag", "env"])
def test_setup_gpu_installs_the_cuda_build_of_torch(copy: Path, how: str) -> None:
    calls = run(copy, "setup.sh", "--gpu") if how == "flag" else run(copy, "setup.sh", CXR_GPU="1")
    assert "pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in calls
    assert any("bitsandbytes" in c for c in calls)
    assert calls[-1] == "pip install -q -e .[models,dev]"


def test_run_passes_commands_to_cxr_agent_and_options_to_serve(copy: Path) -> None:
    run(copy, "setup.sh")
    assert run(copy, "run.sh") == ["cxr-agent serve"]
    assert run(copy, "run.sh", "--config", "x.yaml") == ["cxr-agent serve --config x.yaml"]
    assert run(copy, "run.sh", "status", "--json") == ["cxr-agent status --json"]
    assert run(copy, "run.sh", "--demo") == ["cxr-agent demo"]
    calls = run(copy, "run.sh", "--gpu", "status")  # the GPU set-up first, then the command
    assert any("download.pytorch.org" in c for c in calls) and calls[-1] == "cxr-agent status"
