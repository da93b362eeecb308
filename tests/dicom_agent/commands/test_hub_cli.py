"""``models pull``, ``doctor`` and the loader ask the hub the same question, the same way.

Against a local fake hub (no weights can be downloaded on the test machines; see
tests/support/fakehub.py): ``models pull`` downloads a profile's model and adapter into the hub cache
with progress bars; a gated repository is one clear line in ``pull``, ``doctor`` and the loader
alike; the check goes through ``HTTPS_PROXY`` as a download does (a recording proxy sees it).
Each command runs as a subprocess, since huggingface_hub reads ``HF_ENDPOINT`` at import.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.support.agentproc import CXR_AGENT
from tests.support.fakehub import FakeHub, RecordingProxy

pytestmark = pytest.mark.slow  # each command is a fresh process importing torch: ~5-30 s on 2 busy cores

GATED_DETAIL = "site/gated-model is gated: accept its licence on"


def profile(name: str, model: str, adapter: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "name": name, "task": "grounding", "backend": "transformers", "model": model,
        "device": "cpu", "prompt": "grounding", "parser": "grounding_json",
    }
    if adapter:
        body["adapter"] = adapter
    return body


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub(
        {
            "site/open-model": {"config.json": b'{"model_type": "gemma3"}', "model.safetensors": b"w" * 4096,
                                "model.onnx": b"never fetched"},
            "site/open-adapter": {"adapter_config.json": b"{}", "adapter_model.safetensors": b"a" * 1024},
        },
        gated={"site/gated-model"},
    )
    yield fake
    fake.stop()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "profiles"
    site.mkdir()
    for body in (
        profile("open", "site/open-model", adapter="site/open-adapter"),
        profile("gated", "site/gated-model"),
    ):
        (site / f"{body['name']}.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("CXR_AGENT", "HF_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"))
            and k.lower() not in {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}}
    var = tmp_path / "var"
    return {
        **base,
        "HF_HOME": str(tmp_path / "hf"),
        "CXR_AGENT__PATHS__PROFILES": str(site),
        "CXR_AGENT__PATHS__SPOOL": str(var / "spool"),
        "CXR_AGENT__PATHS__DRAFTS": str(var / "drafts"),
        "CXR_AGENT__PATHS__OUT": str(var / "out"),
        "CXR_AGENT__PATHS__STATE": str(var / "state" / "agent.sqlite3"),
        "CXR_AGENT__PATHS__QUARANTINE": str(var / "quarantine"),
    }


def cli(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CXR_AGENT, *args], env={**env, **extra}, capture_output=True, text=True,
                          timeout=120, check=False)


def profile_line(output: str, name: str) -> str:
    (line,) = [ln for ln in output.splitlines() if f"profile {name} " in ln]
    return line


def test_pull_downloads_model_and_adapter_then_doctor_finds_them(hub: FakeHub, env: dict[str, str]) -> None:
    before = cli(env, "doctor", CXR_AGENT__GROUNDING__PROFILE="open", HF_ENDPOINT=hub.url)
    assert "site/open-model is not cached; " in profile_line(before.stdout, "open")

    done = cli(env, "models", "pull", "open", HF_ENDPOINT=hub.url)
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr  # the hub client's progress bars
    snapshots = list((Path(env["HF_HOME"]) / "hub").glob("models--site--open-*/snapshots/*/*"))
    assert sorted(p.name for p in snapshots) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"]
    assert "profile open is ready to load" in done.stdout
    # the summary table (stderr): what was pulled where
    assert "models pull open" in done.stderr and "site/open-adapter ->" in done.stderr

    after = cli(env, "doctor", CXR_AGENT__GROUNDING__PROFILE="open", HF_ENDPOINT=hub.url)
    line = profile_line(after.stdout, "open")
    assert line.startswith("ok") and "site/open-model is in the local hub cache" in line
    assert "site/open-adapter is in the local hub cache" in line


def test_gated_repo_is_one_clear_line_in_pull_doctor_and_the_loader(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    pulled = cli(env, "models", "pull", "gated", HF_ENDPOINT=hub.url)
    assert pulled.returncode == 2 and GATED_DETAIL in pulled.stderr and "HF_TOKEN" in pulled.stderr

    doctor = cli(env, "doctor", CXR_AGENT__GROUNDING__PROFILE="gated", HF_ENDPOINT=hub.url)
    assert doctor.returncode == 1
    assert profile_line(doctor.stdout, "gated").startswith("FAIL") and GATED_DETAIL in doctor.stdout

    # The loader the agent runs (here through a one-off audit) says the same.
    picture = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (32, 32), 200).save(picture)
    audited = cli(env, "audit", str(picture), "--profile", "gated", HF_ENDPOINT=hub.url)
    assert audited.returncode == 2 and GATED_DETAIL in audited.stderr


def test_the_hub_check_goes_through_https_proxy(env: dict[str, str]) -> None:
    proxy = RecordingProxy()
    address = proxy.url.removeprefix("http://")
    try:
        doctor = cli(env, "doctor", CXR_AGENT__GROUNDING__PROFILE="open",
                     HF_ENDPOINT="https://hub.example.test", HTTPS_PROXY=proxy.url)
    finally:
        proxy.stop()
    assert "CONNECT hub.example.test:443 HTTP/1.1" in proxy.lines
    line = profile_line(doctor.stdout, "open")
    assert line.startswith("FAIL") and "https://hub.example.test cannot be reached" in line
    assert f"through HTTPS_PROXY {address}" in line


def test_pull_with_the_hub_unreachable_says_so(env: dict[str, str]) -> None:
    done = cli(env, "models", "pull", "open", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert "model: site/open-model is not in the local hub cache and" in done.stderr
    assert "cannot be reached" in done.stderr


def test_pull_of_an_unknown_or_weightless_profile(env: dict[str, str]) -> None:
    unknown = cli(env, "models", "pull", "opn")
    assert unknown.returncode == 2 and "unknown profile 'opn'" in unknown.stderr and "open" in unknown.stderr
    fake = cli(env, "models", "pull", "fake")
    assert fake.returncode == 0 and "needs no weights" in fake.stdout
