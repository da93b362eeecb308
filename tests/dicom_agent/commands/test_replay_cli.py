"""``cxr-agent replay`` and ``cxr-agent diff`` on spooled studies: the fake profile (the
deterministic stand-in) and the trained tiny grounder answer known findings, so what each
replay writes and what the diff reports are known."""

# The tiny-model fixtures are imported below; test parameters of the same name are how pytest
# injects them, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_agent.cli import app
from dicom_agent.state import StateDB, StudyState
from tests.conftest import var_paths
from tests.support.builders import make_cxr, save
from tests.support.model_fixtures import (  # noqa: F401 - fixtures
    tiny_profile,
    tiny_root,
    trained_gemma,
    write_profiles,
)

runner = CliRunner()
DRAFT = "Small right pleural effusion. No pneumothorax."


pytestmark = pytest.mark.usefixtures("isolated_cli")


def _config(tmp_path: Path, **extra: Any) -> Path:
    paths = {k: str(v) for k, v in var_paths(tmp_path / "var").items()}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"paths": {**paths, **extra}}))
    return path


def _spooled_study(tmp_path: Path, *, white: bool = False, draft: str | None = DRAFT) -> str:
    """One audited study in the state DB, its image in the spool (solid white when asked:
    the trained tiny model's known input; else the bright phantom), in standard PA display
    (Patient Orientation L\\F: the patient's left on the image right)."""
    uid = generate_uid()
    if white:
        ds = make_cxr(rows=64, cols=64, study_uid=uid, accession="A1", window=(2048, 4096),
                      patient_orientation="L\\F")
        ds.PixelData = bytes([4095 & 0xFF, 4095 >> 8]) * (64 * 64)
    else:
        ds = make_cxr(rows=96, cols=80, study_uid=uid, accession="A1", patient_orientation="L\\F")
    path = save(ds, tmp_path / "var" / "spool" / uid / "0.dcm")
    db = StateDB(tmp_path / "var" / "state" / "agent.sqlite3")
    db.record_instance(
        sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=uid,
        series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
        modality=ds.Modality, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        view_position="PA", body_part="CHEST", accession_number="A1", path=str(path),
        sha256="0" * 64, size=path.stat().st_size, now=1.0,
    )
    if draft is not None:
        _, draft_id = db.record_draft(key=uid, key_kind="study_uid", file_name="d.txt",
                                      sha256="1" * 64, text=draft, author=None, now=2.0)
        db.pair_draft(draft_id, uid, 3.0)
    db.set_study_state(uid, StudyState.AUDITED, 4.0)
    db.close()
    return uid


def _invoke(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _flags(folder: Path, uid: str) -> set[tuple[str, str]]:
    body = json.loads((folder / uid / "audit.json").read_text())
    return {(f["kind"], f["label"]) for f in body["flags"]}


def test_replay_with_the_fake_profile_writes_known_results(tmp_path: Path) -> None:
    config = _config(tmp_path)
    uid = _spooled_study(tmp_path)
    out = tmp_path / "replay-fake"
    result = runner.invoke(app, ["replay", "--profile", "fake", "--out", str(out), "--config",
                                 str(config)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body == {"out": str(out), "profile": "fake", "replayed": 1, "failed": {}}
    # the summary table on stderr: studies and the flags raised, research-only caption
    assert "studies replayed" in result.stderr and "flags missing" in result.stderr
    assert "Research use only" in result.stderr
    # the bright phantom: pneumothorax + effusion; the draft denies the pneumothorax
    assert _flags(out, uid) == {("missing", "pneumothorax"), ("urgent", "pneumothorax")}
    assert (out / uid / "v1" / "audit.json").exists()
    manifest = json.loads((out / "replay.json").read_text())
    assert manifest["profile"] == "fake" and manifest["studies"] == 1
    assert "RESEARCH" in manifest["disclaimer"]
    # the agent's own results are not touched
    assert not (tmp_path / "var" / "out").exists()


def test_replay_named_studies_and_a_missing_spool_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    kept, gone = _spooled_study(tmp_path), _spooled_study(tmp_path)
    (tmp_path / "var" / "spool" / gone / "0.dcm").unlink()
    out = tmp_path / "r"
    body = _invoke("replay", "--profile", "fake", "--studies", f"{kept},{gone}", "--out",
                   str(out), "--config", str(config))
    assert body["replayed"] == 1 and list(body["failed"]) == [gone]
    assert "gone from the spool" in body["failed"][gone]


def test_a_batch_the_model_fails_is_reported_and_the_next_goes_on(tmp_path: Path) -> None:
    from cxr_auditor.errors import BackendError
    from cxr_auditor.profiles import get_profile
    from dicom_agent.config import load_settings
    from dicom_agent.registry import build_runner
    from dicom_agent.replay import replay_studies

    settings = load_settings(_config(tmp_path))
    first, second = _spooled_study(tmp_path), _spooled_study(tmp_path)
    real = build_runner(get_profile("fake"), "rules", settings)
    calls: list[int] = []

    class FailsFirst:
        def audit_batch(self, items: list[Any]) -> list[Any]:
            calls.append(len(items))
            if len(calls) == 1:
                raise BackendError("server answered 503")
            return real.audit_batch(items)

        def close(self) -> None:
            real.close()

    db = StateDB(settings.paths.state)
    report = replay_studies(settings, db, FailsFirst(), get_profile("fake"), tmp_path / "r",
                            [first, second], batch_size=1)
    db.close()
    assert calls == [1, 1]
    assert report.failed == {first: "BackendError: server answered 503"}
    assert report.replayed == [second]
    manifest = json.loads((tmp_path / "r" / "replay.json").read_text())
    assert manifest["studies"] == 1 and list(manifest["failed"]) == [first]


def test_replay_with_an_unknown_prompt_is_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _spooled_study(tmp_path)
    result = runner.invoke(app, ["replay", "--profile", "fake", "--prompt", "nope", "--config",
                                 str(config)])
    assert result.exit_code == 2 and "prompt must be one of" in result.stderr
    assert "Traceback" not in result.output


def test_replay_refuses_bad_uids_and_unknown_profiles(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _spooled_study(tmp_path)
    result = runner.invoke(app, ["replay", "--profile", "fake", "--studies", "../etc",
                                 "--config", str(config)])
    assert result.exit_code == 2 and "not DICOM UIDs" in result.stderr
    result = runner.invoke(app, ["replay", "--profile", "nope", "--config", str(config)])
    assert result.exit_code == 2 and "nope" in result.stderr


def test_diff_reports_what_changed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    uid = _spooled_study(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    _invoke("replay", "--profile", "fake", "--out", str(a), "--config", str(config))
    # the same study with a draft that names both findings: the missing flag goes away (the
    # urgent one stays, now not missed)
    db = StateDB(tmp_path / "var" / "state" / "agent.sqlite3")
    _, draft_id = db.record_draft(key=uid, key_kind="study_uid", file_name="e.txt",
                                  sha256="2" * 64, text="Right pleural effusion. Left pneumothorax.",
                                  author=None, now=5.0)
    db.pair_draft(draft_id, uid, 6.0)
    db.close()
    _invoke("replay", "--profile", "fake", "--out", str(b), "--config", str(config))
    result = runner.invoke(app, ["diff", str(a), str(b)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["compared"] == 1 and body["changed"] == 1
    assert body["counts"]["flags_removed"] == {"missing:pneumothorax": 1}
    assert body["counts"]["flags_added"] == {}
    assert body["counts"]["findings_added"] == {}
    assert "1 of 1 studies changed" in result.stderr
    same = json.loads(runner.invoke(app, ["diff", str(a), str(a / uid / "audit.json")]).stdout)
    assert same["compared"] == 0 and same["only_in_a"] == [uid] and same["only_in_b"] == ["-"]


def test_diff_of_a_folder_without_results_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["diff", str(tmp_path / "empty"), str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no <study>/audit.json" in result.stderr


@pytest.mark.slow
def test_replay_with_the_trained_tiny_grounder_and_diff_against_the_stand_in(
    tmp_path: Path, trained_gemma: Path, write_profiles: Any
) -> None:
    site = write_profiles(
        tiny_profile("cxr-auditor-v2", trained_gemma, name="tiny-v2", prompt="explain_my_xray")
    )
    config = _config(tmp_path, profiles=str(site))
    uid = _spooled_study(tmp_path, white=True)
    fake, tiny = tmp_path / "fake", tmp_path / "tiny"
    _invoke("replay", "--profile", "fake", "--out", str(fake), "--config", str(config))
    _invoke("replay", "--profile", "tiny-v2", "--out", str(tiny), "--config", str(config))
    result = json.loads((tiny / uid / "audit.json").read_text())
    assert [f["label"] for f in result["grounding"]["findings"]] == ["pneumothorax"]
    assert result["models"][0]["profile"] == "tiny-v2"
    body = _invoke("diff", str(fake), str(tiny))
    # the stand-in also reports an effusion (patient's right); the tiny model does not
    assert body["counts"]["findings_removed"] == {"pleural_effusion:right": 1}
    assert body["counts"]["findings_added"] == {}
    # the same model on the angiography prompt answers "The vessel is occluded.": no grounding
    other = tmp_path / "other-prompt"
    _invoke("replay", "--profile", "tiny-v2", "--prompt", "dsa_patency", "--out", str(other),
            "--config", str(config))
    assert json.loads((other / "replay.json").read_text())["prompt"] == "dsa_patency"
    body = _invoke("diff", str(tiny), str(other))
    assert body["studies"][uid]["grounding_state"] == ["ok", "failed"]
    assert body["counts"]["findings_removed"] == {"pneumothorax:left": 1}
    prompts = {json.loads((d / uid / "audit.json").read_text())["models"][0]["prompt_hash"]
               for d in (tiny, other)}
    assert len(prompts) == 2
