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

from benchmarks import eval_example
from dicom_agent.cli import app
from tests.support import tinymodels as tm
from tests.support.model_fixtures import (  # noqa: F401 - fixtures
    tiny_profile,
    tiny_root,
    trained_gemma,
    write_profiles,
)

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("isolated_cli")


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


def _quoted_rows() -> list[str]:
    """The table rows docs/evaluation.md quotes for its example."""
    doc = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    example = doc.split("### Example", 1)[1].split("\nRead with the intervals", 1)[0]
    return [line for line in example.splitlines() if line.startswith("│")]


def test_docs_example_figures(tmp_path: Path) -> None:
    """The command docs/evaluation.md runs prints the rows it quotes (fake stand-in, bright
    images: pneumothorax + effusion at known boxes, dark ones: no finding), in batches too."""
    eval_example.main(tmp_path / "ex")
    result = runner.invoke(app, ["eval", "--images", str(tmp_path / "ex"), "--truth",
                                 str(tmp_path / "ex" / "truth.jsonl"), "--profile", "fake",
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = _quoted_rows()
    for first in ("│ pneumothorax ", "│ mean IoU ", "│ cases exactly right "):  # all 3 tables
        assert any(row.startswith(first) for row in rows), first
    missing = [row for row in rows if row not in result.stderr]
    assert not missing, result.stderr
    out = json.loads(result.stdout)
    assert out["cases"] == 5 and out["profile"] == "fake" and "RESEARCH" in out["disclaimer"]
    # the effusion truth is shifted by half the box width: IoU = 0.17 / (0.34 + 0.34 - 0.17) = 1/3
    assert out["localisation"]["mean_iou"] == pytest.approx(2 / 3, abs=1e-3)


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
