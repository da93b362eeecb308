"""``cxr-agent eval`` on the deterministic stand-in (fake profile) and on the trained tiny
grounder, whose answers are known, so every figure is known too."""

# The tiny-model fixtures are imported below; test parameters of the same name are how pytest
# injects them, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cxr_auditor.grounding.fake import BRIGHT_ANSWER
from dicom_agent.cli import app
from tests.support import tinymodels as tm
from tests.support.model_fixtures import (  # noqa: F401 - fixtures
    tiny_profile,
    tiny_root,
    trained_gemma,
    write_profiles,
)

runner = CliRunner()
PTX_BOX, EFF_BOX = (item["box_2d"] for item in json.loads(BRIGHT_ANSWER))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("CXR_AGENT_CONFIG", "CXR_AGENT__PATHS__PROFILES", "CXR_AGENT__GROUNDING__PROFILE"):
        monkeypatch.delenv(key, raising=False)


def _images(folder: Path, **values: int) -> Path:
    folder.mkdir(exist_ok=True)
    for name, value in values.items():
        tm.solid_image(value).save(folder / f"{name}.png")
    return folder


def _truth(path: Path, *cases: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


def _eval(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_fake_profile_known_figures(tmp_path: Path) -> None:
    """Bright images get pneumothorax + effusion at known boxes, dark ones no finding."""
    images = _images(tmp_path / "img", white=255, white2=255, black=0)
    truth = _truth(
        tmp_path / "truth.jsonl",
        {"image": "white.png", "labels": ["pneumothorax", "pleural_effusion"],
         "boxes": [{"label": "pneumothorax", "box_2d": PTX_BOX},
                   {"label": "pleural_effusion", "box_2d": [0.6, 0.23, 0.92, 0.57]}],
         "draft": "No pneumothorax.",
         "flags": [{"kind": "missing", "label": "pneumothorax"},
                   {"kind": "urgent", "label": "pneumothorax"},
                   {"kind": "missing", "label": "pleural_effusion"}]},
        {"image": "white2.png", "labels": []},
        {"image": "black.png", "labels": []},
    )
    out = _eval("--images", str(images), "--truth", str(truth), "--profile", "fake",
                "--batch-size", "2")
    assert out["cases"] == 3 and out["profile"] == "fake" and "RESEARCH" in out["disclaimer"]
    ptx = out["presence"]["pneumothorax"]
    assert (ptx["tp"], ptx["fp"], ptx["fn"], ptx["tn"]) == (1, 1, 0, 1)
    assert ptx["precision"]["value"] == 0.5 and ptx["recall"]["value"] == 1.0
    assert out["urgent_recall"]["value"] == 1.0 and out["urgent_recall"]["n"] == 1
    loc = out["localisation"]
    # the effusion truth is shifted by half the box width: IoU = 0.17 / (0.34 + 0.34 - 0.17) = 1/3
    assert loc["truth_boxes"] == 2 and loc["iou0.3"]["hits"] == 2 and loc["iou0.5"]["hits"] == 1
    assert out["audit_flags"]["cases"] == 1 and out["audit_flags"]["exact_match"]["value"] == 1.0


def test_results_of_two_runs_compare_with_diff(tmp_path: Path) -> None:
    images = _images(tmp_path / "img", white=255, black=0)
    truth = _truth(tmp_path / "t.jsonl", {"image": "white.png", "labels": ["pneumothorax"]},
                   {"image": "black.png", "labels": []})
    for run, draft in (("a", None), ("b", "Left pneumothorax.")):
        if draft:  # the second run audits the white image with a draft naming the pneumothorax
            truth.write_text(truth.read_text().replace(
                '"labels": ["pneumothorax"]}', f'"labels": ["pneumothorax"], "draft": "{draft}"}}'))
        _eval("--images", str(images), "--truth", str(truth), "--profile", "fake",
              "--results", str(tmp_path / run))
    assert (tmp_path / "a" / "white.png" / "audit.json").exists()
    result = runner.invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    body = json.loads(result.stdout)
    assert body["compared"] == 2 and body["changed"] == 1
    assert body["studies"]["white.png"]["mode"] == ["image_only", "full"]


def test_results_of_images_whose_names_sanitise_alike_stay_apart(tmp_path: Path) -> None:
    images = _images(tmp_path / "img", a_b=255)
    _images(images / "a", b=0)  # "a/b.png" and "a_b.png" have the same safe name
    truth = _truth(tmp_path / "t.jsonl", {"image": "a_b.png", "labels": []},
                   {"image": "a/b.png", "labels": []})
    _eval("--images", str(images), "--truth", str(truth), "--profile", "fake",
          "--results", str(tmp_path / "r"))
    folders = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert len(folders) == 2 and folders[0] == "a_b.png", folders
    bodies = [(tmp_path / "r" / f / "audit.json").read_text() for f in folders]
    assert "pneumothorax" in bodies[0] and "pneumothorax" not in bodies[1]  # bright vs dark


def test_jsonl_images_are_their_own_truth_and_tables_go_to_stderr(tmp_path: Path) -> None:
    _images(tmp_path, black=0)
    cases = _truth(tmp_path / "cases.jsonl", {"image": "black.png", "labels": ["nodule_mass"]})
    result = runner.invoke(app, ["eval", "--images", str(cases), "--profile", "fake"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["presence"]["nodule_mass"]["fn"] == 1 and out["urgent_recall"]["value"] == 0.0
    assert "Presence (1 cases" in result.stderr and "Research use only" in result.stderr


@pytest.mark.parametrize(
    ("truth_line", "message"),
    [
        ({"image": "missing.png", "labels": []}, "no such file"),
        ({"image": "black.png", "labels": ["fracture"]}, "line 1: labels.0"),
    ],
)
def test_bad_truth_is_one_line(tmp_path: Path, truth_line: dict[str, Any], message: str) -> None:
    images = _images(tmp_path / "img", black=0)
    truth = _truth(tmp_path / "t.jsonl", truth_line)
    result = runner.invoke(app, ["eval", "--images", str(images), "--truth", str(truth),
                                 "--profile", "fake"])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_folder_without_truth_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--images", str(_images(tmp_path / "i", b=0))])
    assert result.exit_code == 2 and "--truth is needed" in result.stderr


@pytest.mark.slow
def test_trained_tiny_grounder_known_answers(
    tmp_path: Path, trained_gemma: Path, write_profiles: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = write_profiles(
        tiny_profile("cxr-auditor-v2", trained_gemma, name="tiny-v2", prompt="explain_my_xray")
    )
    monkeypatch.setenv("CXR_AGENT__PATHS__PROFILES", str(site))
    images = _images(tmp_path / "img", white=255, black=0)
    box = json.loads(tm.WHITE_ANSWER)[0]["box_2d"]
    truth = _truth(
        tmp_path / "truth.jsonl",
        {"image": "white.png", "labels": ["pneumothorax"],
         "boxes": [{"label": "pneumothorax", "box_2d": box}]},
        {"image": "black.png", "labels": ["cardiomegaly"]},
    )
    out = _eval("--images", str(images), "--truth", str(truth), "--profile", "tiny-v2",
                "--json-out", str(tmp_path / "report.json"))
    assert out["presence"]["pneumothorax"]["f1"] == 1.0
    assert out["presence"]["cardiomegaly"]["recall"]["value"] == 0.0
    assert out["localisation"]["iou0.5"]["hits"] == 1
    assert out["localisation"]["mean_iou"] == pytest.approx(1.0, abs=1e-3)
    assert json.loads((tmp_path / "report.json").read_text()) == out
