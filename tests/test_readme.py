"""The README works as written: every command of its ``bash`` blocks is run, in order.

The commands run in a scratch root that holds the README, ``scripts/`` and ``pyproject.toml``
and links the checkout's ``.venv`` (set up already by ``scripts/test.sh``, so ``setup.sh`` is a
no-op there), i.e. the state of a fresh clone after its first ``scripts/run.sh``. Adjustments,
each because of the test machine and not of the README:

- ``bash scripts/run.sh`` (the agent, until Ctrl-C) runs in the background on free ports (other
  tests run beside this one) and is stopped with SIGTERM at the end; ``11112`` in the commands
  that talk to it becomes that port.
- ``bash scripts/test.sh`` is not run: it is the CI run this test is part of.
- The hub is a closed local port (``HF_ENDPOINT``): no weights can be downloaded here, so
  ``models pull`` and ``doctor`` must fail, each with the reason it gives a user without network.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.support.agentproc import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Commands that cannot succeed without the hub, with the exit status and the line they must print.
NEEDS_THE_HUB = {
    "bash scripts/run.sh models pull cxr-auditor-v2": (2, "cannot be reached"),
    "bash scripts/run.sh doctor": (1, "FAIL profile cxr-auditor-v2"),
}


def readme_commands() -> list[str]:
    """Each command line of the README's ``bash`` blocks, comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_lists_the_first_hour() -> None:
    commands = readme_commands()
    assert commands[:3] == ["bash scripts/run.sh", "bash scripts/test.sh", "bash scripts/run.sh demo"]
    assert not any("<" in c for c in commands)  # no placeholders such as <AccessionNumber>


def test_every_readme_command_works_as_written(tmp_path: Path) -> None:
    stamp = ROOT / ".venv" / f".installed-{hashlib.sha256((ROOT / 'pyproject.toml').read_bytes()).hexdigest()[:16]}"
    assert stamp.exists(), "run `bash scripts/setup.sh` first: this test must not install anything"
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    for name in ("README.md", "pyproject.toml", "scripts/setup.sh", "scripts/run.sh", "scripts/test.sh"):
        (root / name).write_bytes((ROOT / name).read_bytes())
    (root / ".venv").symlink_to(ROOT / ".venv")
    port, health = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_AGENT", "HF_"))}
    env.update({
        "PATH": os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p),
        "CXR_AGENT__SCP__PORT": str(port), "CXR_AGENT__HEALTH__PORT": str(health),
        "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    })
    agent: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "agent.log").open("wb")
    try:
        for command in readme_commands():
            if command == "bash scripts/test.sh":
                assert (root / "scripts" / "test.sh").exists()  # the CI run this test is part of
                continue
            if command == "bash scripts/run.sh":
                agent = started = subprocess.Popen(["bash", "scripts/run.sh"], cwd=root, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
                wait_until(lambda: _answers(f"http://127.0.0.1:{health}/healthz"), timeout=120,
                           what="the README's agent",
                           alive=lambda p=started: _alive(p, tmp_path / "agent.log"))  # type: ignore[misc]
                continue
            done = subprocess.run(["bash", "-c", command.replace(" 11112", f" {port}")], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=400, check=False)
            output = done.stdout + done.stderr
            expected_code, expected_line = NEEDS_THE_HUB.get(command, (0, ""))
            assert done.returncode == expected_code, f"{command!r} exited {done.returncode}:\n{output[-3000:]}"
            assert expected_line in output, f"{command!r} did not say {expected_line!r}:\n{output[-3000:]}"
            if command.endswith(" status"):
                assert "DEMO-002" in output  # the study just sent, listed with what it waits for
    finally:
        if agent is not None and agent.poll() is None:
            os.killpg(agent.pid, signal.SIGTERM)
            agent.wait(timeout=60)
        log.close()
    assert agent is not None and agent.returncode == 0  # a clean stop on SIGTERM
    # The one output the README opens in an image viewer rather than with a command.
    with Image.open(root / "var" / "demo" / "results" / "DEMO-001" / "overlay-0.png") as overlay:
        overlay.verify()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def _alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"scripts/run.sh exited {proc.returncode}:\n{log.read_text()[-3000:]}")
