"""Static checks of the Dockerfile and compose file (no container engine runs in CI).

They fail when the Dockerfile copies a path that does not exist, runs a command the CLI does not
have, runs as root, or forgets the health check, volumes or ports.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dicom_agent.cli import app
from dicom_agent.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _one(word: str) -> str:
    values = [rest for w, rest in _instructions() if w == word]
    assert len(values) == 1, f"expected exactly one {word}"
    return values[0]


def test_every_copied_path_exists() -> None:
    copies = [rest for w, rest in _instructions() if w == "COPY"]
    assert copies
    for rest in copies:
        sources = shlex.split(rest)[:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies missing path {src}"


def test_install_keeps_the_config_folder_beside_the_packages() -> None:
    """dicom_agent.config and cxr_auditor.profiles read ``config/`` next to the packages, so
    the image must install editable from the folder it copied them to."""
    from cxr_auditor import profiles
    from dicom_agent import config

    assert config.EMBEDDED_CONFIG == ROOT / "config" / "agent.yaml"
    assert Path(profiles.__file__).resolve().parent.parent == ROOT
    workdir = Path(_one("WORKDIR"))
    runs = [rest for w, rest in _instructions() if w == "RUN" and "pip install" in rest]
    assert any('pip install -e ".[models]"' in r for r in runs)
    copied = {shlex.split(rest)[-1] for w, rest in _instructions() if w == "COPY"}
    assert {"./config", "./cxr_auditor", "./dicom_agent"} <= copied
    assert workdir == Path("/app")


def test_entrypoint_and_cmd_are_real_cli_commands(tmp_path: Path) -> None:
    entry = json.loads(_one("ENTRYPOINT"))
    cmd = json.loads(_one("CMD"))
    assert entry == ["cxr-agent"]
    # the console script the entry point names is declared in pyproject
    assert 'cxr-agent = "dicom_agent.cli:main"' in (ROOT / "pyproject.toml").read_text()
    result = CliRunner().invoke(app, [cmd[0], "--help"])
    assert result.exit_code == 0, result.output
    assert "--config" in result.output
    config_path = Path(cmd[cmd.index("--config") + 1])
    copied = [shlex.split(rest) for w, rest in _instructions() if w == "COPY"]
    assert any(parts[-1] == str(config_path) for parts in copied), "CMD config is not copied"


def test_container_config_is_valid_and_matches_exposed_ports() -> None:
    settings = load_settings(ROOT / "docker" / "agent.yaml")
    exposed = {int(p) for p in _one("EXPOSE").split()}
    assert {settings.scp.port, settings.health.port} <= exposed
    assert settings.scp.host == "0.0.0.0" and settings.health.host == "0.0.0.0"
    volumes = set(json.loads(_one("VOLUME")))
    for folder in (settings.paths.spool, settings.paths.drafts, settings.paths.out):
        assert str(folder) in volumes
    assert str(settings.paths.state.parent) in volumes
    assert all(d.research for d in settings.forward.destinations)


def test_runs_as_non_root_with_healthcheck() -> None:
    user = _one("USER")
    assert user not in {"root", "0"}
    health = _one("HEALTHCHECK")
    assert "/healthz" in health
    settings = load_settings(ROOT / "docker" / "agent.yaml")
    assert f":{settings.health.port}/" in health


def test_compose_runs_agent_next_to_orthanc() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"agent", "orthanc"} <= set(services)
    orthanc_cfg = json.loads((ROOT / "docker" / "orthanc.json").read_text())
    settings = load_settings(ROOT / "docker" / "agent.yaml")
    aet, host, port = orthanc_cfg["DicomModalities"]["cxraudit"]
    assert (aet, host, port) == (settings.scp.ae_title, "agent", settings.scp.port)
    assert orthanc_cfg["DicomAet"] in settings.scp.allowed_calling_aets
    dest = settings.forward.destinations[0]
    assert (dest.host, dest.port, dest.ae_title) == ("orthanc", orthanc_cfg["DicomPort"], "ORTHANC")
    for volume in services["orthanc"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).exists()


def test_compose_publishes_every_port_on_loopback_only() -> None:
    """Plain DICOM, Orthanc's UI and the health endpoint are not published on every interface
    (a bare "11112:11112" binds 0.0.0.0 on the host)."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert {p.split(":")[-1] for p in published} >= {"11112", "8080", "8042"}
    assert all(p.startswith("127.0.0.1:") for p in published), published


def test_compose_passes_hf_token_and_keeps_the_hub_cache_on_a_volume() -> None:
    """A recreated container must not download the model again, and gated models need a token."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    agent = compose["services"]["agent"]
    assert agent["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    (hf_home,) = re.findall(r"HF_HOME=(\S+)", dockerfile)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in agent["volumes"]}
    assert mounts[hf_home] in compose["volumes"]  # a named volume, not the container's layer
    assert f'"{hf_home}"' in dockerfile.split("VOLUME", 1)[1].splitlines()[0]


def test_vllm_recipes_serve_the_names_the_shipped_profiles_ask_for() -> None:
    """The served model name must equal an OpenAI-backend profile's ``model`` (else HTTP 404)."""
    from cxr_auditor.profiles import OpenAIProfile, load_profiles

    wanted = {p.model for p in load_profiles().values() if isinstance(p, OpenAIProfile)}
    command = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["vllm"]["command"]
    assert command[command.index("--served-model-name") + 1] in wanted
    docs = (ROOT / "docs" / "models.md").read_text()
    recipes = re.findall(r"vllm serve (\S+)(.*?)(?:\n\n|```)", docs.replace("\\\n", " "), re.S)
    assert recipes
    for model, rest in recipes:
        served = re.search(r"--served-model-name (\S+)", rest)
        assert (served.group(1) if served else model) in wanted
        assert "--lora-modules" not in rest  # an adapter would be served under another name
