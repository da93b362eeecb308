"""Tests of ``cxr-agent audit`` and ``cxr-agent doctor`` through typer's CliRunner."""

# The tiny-model fixtures are imported below; test parameters of the same name are how pytest
# injects them, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dicom_agent.cli import app
from tests.support import tinymodels as tm
from tests.support.builders import SENTINEL_PATIENT_NAME, make_cxr, save
from tests.support.model_fixtures import (  # noqa: F401 - fixtures
    tiny_gemma,
    tiny_profile,
    tiny_root,
    trained_gemma,
    write_profiles,
    zero_lora_adapter,
)

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("isolated_cli")


def _png(folder: Path, value: int, name: str) -> Path:
    path = folder / name
    tm.solid_image(value).save(path)
    return path


def _audit(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["audit", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


class TestAudit:
    def test_dicom_file_with_fake_profile_prints_audit_result(self, tmp_path: Path) -> None:
        ds = make_cxr(rows=256, cols=200)
        path = save(ds, tmp_path / "cxr.dcm")
        out = _audit(str(path), "--profile", "fake", "--draft", "Large right pneumothorax.")
        assert out["inputs"]["images"][0]["sop_instance_uid"] == ds.SOPInstanceUID
        assert (out["inputs"]["images"][0]["width"], out["inputs"]["images"][0]["height"]) == (200, 256)
        assert out["grounding"]["state"] == "ok"
        # The phantom is bright: the fake grounder's bright answer (pneumothorax + effusion).
        assert [f["label"] for f in out["grounding"]["findings"]] == ["pneumothorax", "pleural_effusion"]
        assert out["draft"]["state"] == "parsed" and out["models"][0]["profile"] == "fake"
        flags = {(f["kind"], f["label"]) for f in out["flags"]}
        assert {("missing", "pleural_effusion"), ("urgent", "pneumothorax")} <= flags
        assert "RESEARCH" in out["disclaimer"] and SENTINEL_PATIENT_NAME not in json.dumps(out)

    def test_dicom_study_keys_and_routing_are_those_of_serve(self, tmp_path: Path) -> None:
        """Issue 15: ``study`` was empty and a lateral view was grounded, which serve skips."""
        pa = make_cxr(rows=128, cols=100, study_uid="1.2.826.0.1.77", accession="ACC-77")
        lateral = make_cxr(rows=128, cols=100, study_uid="1.2.826.0.1.77", accession="ACC-77",
                           view_position="LL")
        paths = [save(pa, tmp_path / "pa.dcm"), save(lateral, tmp_path / "lat.dcm")]
        out = _audit(*map(str, paths), "--profile", "fake")
        assert out["study"] == {"study_instance_uid": "1.2.826.0.1.77", "accession_number": "ACC-77"}
        assert [i["image_id"] for i in out["inputs"]["images"]] == [pa.SOPInstanceUID]
        assert out["inputs"]["images"][0]["view_position"] == "PA"
        assert out["timings"] and all(stage.endswith("_ms") for stage in out["timings"])
        assert out["inputs"]["skipped_images"] == [
            {"image_id": lateral.SOPInstanceUID, "reason": "lateral_view"}
        ]

    def test_ends_with_its_summary_table_on_stderr(self, tmp_path: Path) -> None:
        result = runner.invoke(app, ["audit", str(_png(tmp_path, 255, "white.png")),
                                     "--profile", "fake", "--draft", "No pneumothorax."])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["grounding"]["state"] == "ok"  # stdout stays JSON only
        assert "audit (fake)" in result.stderr and "images audited" in result.stderr
        assert "flags urgent" in result.stderr and "Research use only" in result.stderr

    def test_draft_file_is_hashed_and_named(self, tmp_path: Path) -> None:
        draft = tmp_path / "draft.txt"
        draft.write_text("No acute cardiopulmonary abnormality.\n")
        out = _audit(str(_png(tmp_path, 0, "a.png")), "--profile", "fake", "--draft-file", str(draft))
        assert out["inputs"]["draft_file"] == "draft.txt"
        assert len(out["inputs"]["draft_sha256"]) == 64 and out["mode"] == "full"

    def test_unknown_profile_lists_known_ones(self, tmp_path: Path) -> None:
        result = runner.invoke(app, ["audit", str(_png(tmp_path, 0, "a.png")), "--profile", "nope"])
        assert result.exit_code == 2
        assert "unknown profile 'nope'" in result.stderr and "cxr-auditor-v2" in result.stderr

    def test_draft_and_draft_file_together_are_refused(self, tmp_path: Path) -> None:
        png = str(_png(tmp_path, 0, "a.png"))
        result = runner.invoke(app, ["audit", png, "--draft", "x", "--draft-file", png])
        assert result.exit_code == 2 and "not both" in result.stderr

    def test_draft_parsing_profile_cannot_audit_images(self, tmp_path: Path) -> None:
        result = runner.invoke(app, ["audit", str(_png(tmp_path, 0, "a.png")), "--profile", "rules"])
        assert result.exit_code == 2 and "parses drafts" in result.stderr

    def test_file_that_is_no_image_is_refused(self, tmp_path: Path) -> None:
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"\x00" * 300)
        result = runner.invoke(app, ["audit", str(junk), "--profile", "fake"])
        assert result.exit_code == 2 and "neither DICOM nor a readable picture" in result.stderr

    def test_model_that_cannot_load_is_one_line(self, tmp_path: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        site = write_profiles(tiny_profile("cxr-auditor-v2", tmp_path / "no-such-model", name="broken"))
        monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
        result = runner.invoke(app, ["audit", str(_png(tmp_path, 0, "a.png")), "--profile", "broken"])
        assert result.exit_code == 2
        assert "profile 'broken': model folder" in result.stderr and "does not exist" in result.stderr and "Traceback" not in result.output

    @pytest.mark.slow
    def test_trained_tiny_grounder_end_to_end(
        self, tmp_path: Path, trained_gemma: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        site = write_profiles(
            tiny_profile("cxr-auditor-v2", trained_gemma, name="tiny-v2", prompt="explain_my_xray")
        )
        monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
        white, black = _png(tmp_path, 255, "white.png"), _png(tmp_path, 0, "black.png")
        out = _audit(str(white), str(black), "--profile", "tiny-v2", "--draft", "No pneumothorax.")
        findings = out["grounding"]["findings"]
        assert [(f["label"], f["image_index"]) for f in findings] == [("pneumothorax", 0)]
        assert findings[0]["box"] == pytest.approx({"y0": 0.1, "x0": 0.6, "y1": 0.5, "x1": 0.9})
        assert findings[0]["pixel_box"] == pytest.approx({"x0": 38.4, "y0": 6.4, "x1": 57.6, "y1": 32.0})
        kinds = {(f["kind"], f.get("denied"), f.get("missed")) for f in out["flags"]}
        assert ("missing", True, None) in kinds and ("urgent", None, True) in kinds
        assert out["models"][0]["model_id"] == str(trained_gemma)

    @pytest.mark.slow
    def test_dsa_profile_fills_classification(
        self, tmp_path: Path, trained_gemma: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        site = write_profiles(tiny_profile("dsa-patency", trained_gemma, name="tiny-dsa", adapter=None))
        monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
        out = _audit(str(_png(tmp_path, 255, "run.png")), "--profile", "tiny-dsa")
        assert out["classification"]["label"] == "blocked" and out["classification"]["urgent"] is True
        assert out["classification"]["images"][0]["raw_text"] == "The vessel is occluded."
        assert out["grounding"]["state"] == "skipped" and out["flags"] == []


class TestDoctor:
    def test_bad_config_prints_one_line_per_key_and_exits_2(self, tmp_path: Path) -> None:
        """doctor names every bad key, as serve does (it printed only the first)."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("scp:\n  port: 70000\nbogus: 1\n")
        result = runner.invoke(app, ["doctor", "--config", str(bad)])
        assert result.exit_code == 2
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 2, result.stderr
        assert any("scp.port" in ln for ln in lines) and any("bogus" in ln for ln in lines)

    def test_configured_profiles_and_checks_one_line_each(self) -> None:
        result = runner.invoke(app, ["doctor"])
        lines = result.stdout.splitlines()
        assert any(line.startswith("ok   dependency pydicom") for line in lines)
        assert any("folder paths.spool" in line for line in lines)
        assert any(line.startswith("ok   profile rules (draft_parsing, rules)") for line in lines)
        (v2,) = [line for line in lines if "profile cxr-auditor-v2 " in line]
        # ok when cached or the hub answers, FAIL with the reason otherwise (tests/.../test_hub_cli.py)
        assert v2.split()[0] in {"ok", "FAIL"} and "alex-feeel/medgemma-cxr-auditor-v2" in v2

    def test_missing_local_model_fails_with_reason(
        self, tmp_path: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        site = write_profiles(tiny_profile("cxr-auditor-v2", tmp_path / "gone", name="broken"))
        monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
        monkeypatch.setenv("CXR_AGENT__GROUNDING__PROFILE", "broken")
        result = runner.invoke(app, ["doctor"])
        assert result.exit_code == 1
        assert f"FAIL profile broken (grounding, transformers): folder {tmp_path / 'gone'} does not exist" in result.stdout

    def test_load_refuses_a_no_op_adapter(
        self, tiny_gemma: Path, zero_lora_adapter: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        site = write_profiles(
            tiny_profile("cxr-auditor-v2", tiny_gemma, name="tiny-ok"),
            tiny_profile("cxr-auditor-v2-adapter", tiny_gemma, name="tiny-noop", adapter=str(zero_lora_adapter)),
        )
        monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
        result = runner.invoke(app, ["doctor", "--all", "--load"])
        lines = result.stdout.splitlines()
        (ok,) = [line for line in lines if "profile tiny-ok " in line]
        (noop,) = [line for line in lines if "profile tiny-noop " in line]
        assert ok.startswith("ok") and "loaded on cpu" in ok
        assert noop.startswith("FAIL") and "did not change the base weights" in noop
        assert result.exit_code == 1

    def test_unreachable_openai_server_fails(self, tmp_path: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from tests.conftest import free_port

        site = write_profiles(
            {"name": "remote", "task": "grounding", "backend": "openai", "model": "m",
             "base_url": f"http://127.0.0.1:{free_port()}/v1"}
        )
        monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
        monkeypatch.setenv("CXR_AGENT__GROUNDING__PROFILE", "remote")
        result = runner.invoke(app, ["doctor"])
        assert result.exit_code == 1 and "unreachable (ConnectError)" in result.stdout
