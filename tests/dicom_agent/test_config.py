"""Settings: source order, one error line per bad key, and docs/config.md covering every key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from dicom_agent.config import EMBEDDED_CONFIG, AgentSettings, load_settings
from dicom_agent.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_setting_is_documented_with_its_env_name() -> None:
    text = DOCS.read_text(encoding="utf-8")
    keys = leaf_keys(AgentSettings)
    assert len(keys) > 60
    for key in keys:
        env = "CXR_AGENT__" + key.upper().replace(".", "__")
        assert f"| `{key}` |" in text, key
        assert f"`{env}`" in text, env


def test_embedded_defaults_agree_with_the_field_defaults() -> None:
    embedded = yaml.safe_load(EMBEDDED_CONFIG.read_text(encoding="utf-8"))
    checked = 0
    for section, values in embedded.items():
        factory = AgentSettings.model_fields[section].default_factory
        assert factory is not None
        defaults = factory()  # type: ignore[call-arg]
        dumped = defaults.model_dump(mode="json")
        for key, value in values.items():
            assert dumped[key] == value, f"{section}.{key}"
            checked += 1
    assert checked > 20


def test_environment_beats_file_and_file_beats_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "a.yaml"
    cfg.write_text("pairing:\n  settle_seconds: 2\n  draft_wait_seconds: 5\n")
    monkeypatch.setenv("CXR_AGENT__PAIRING__SETTLE_SECONDS", "3")
    s = load_settings(cfg)
    assert (s.pairing.settle_seconds, s.pairing.draft_wait_seconds) == (3, 5)
    assert s.pairing.study_wait_seconds == 3600


def test_each_bad_key_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("worker:\n  batch_size: 0\npairing:\n  no_draft_policy: sometimes\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    lines = sorted(str(info.value).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith("config key pairing.no_draft_policy:")
    assert lines[1].startswith("config key worker.batch_size:")


def test_xa_profile_is_off_by_default() -> None:
    assert load_settings().grounding.xa_profile is None
