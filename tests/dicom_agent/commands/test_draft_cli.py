"""``cxr-agent parse-draft`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxr_auditor.drafts.rules import RulesDraftParser
from cxr_auditor.errors import BackendError
from dicom_agent.cli import app

runner = CliRunner()


def test_file_prints_json_list(tmp_path: Path) -> None:
    draft = tmp_path / "draft.txt"
    draft.write_text("FINDINGS: Small left effusion.\nIMPRESSION: No pneumothorax.\n")
    out = runner.invoke(app, ["parse-draft", str(draft)])
    assert out.exit_code == 0, out.output
    records = json.loads(out.stdout)
    assert records == [
        {"label": "pleural_effusion", "status": "present", "span": "Small left effusion",
         "start": 10, "end": 29, "laterality": "left"},
        {"label": "pneumothorax", "status": "absent", "span": "No pneumothorax",
         "start": 43, "end": 58},
    ]


def test_stdin_with_crlf() -> None:
    out = runner.invoke(app, ["parse-draft", "-"], input="Lungs clear.\r\nNo PTX.\r\n")
    assert out.exit_code == 0
    assert {r["label"] for r in json.loads(out.stdout)} == {
        "lung_opacity_consolidation", "pneumothorax"}


def test_non_utf8_is_replaced_and_reported(tmp_path: Path) -> None:
    draft = tmp_path / "latin1.txt"
    draft.write_bytes("No pleural effusion. Caf\u00e9 pneumothorax.".encode("latin-1"))
    out = runner.invoke(app, ["parse-draft", str(draft)])
    assert out.exit_code == 0
    assert "not valid UTF-8" in out.stderr
    assert {r["label"] for r in json.loads(out.stdout)} == {"pleural_effusion", "pneumothorax"}


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    out = runner.invoke(app, ["parse-draft", str(tmp_path / "nope.txt")])
    assert out.exit_code == 2
    assert out.stderr.strip().splitlines() == [f"error: file not found: {tmp_path / 'nope.txt'}"]
    assert "Traceback" not in out.output


def test_empty_input_fails() -> None:
    out = runner.invoke(app, ["parse-draft", "-"], input="  \n ")
    assert out.exit_code == 2
    assert out.stderr.strip() == "error: draft is empty"


def test_needs_exactly_one_source(tmp_path: Path) -> None:
    assert runner.invoke(app, ["parse-draft"]).exit_code == 2
    both = runner.invoke(app, ["parse-draft", "-", "--jsonl", "-"], input="")
    assert both.exit_code == 2 and "one draft FILE" in both.stderr


def test_jsonl_batch_reports_bad_lines_and_continues(tmp_path: Path) -> None:
    batch = tmp_path / "in.jsonl"
    batch.write_text(
        "\n".join([
            json.dumps({"id": "a", "text": "No pneumothorax."}),
            "{not json",
            json.dumps({"id": "b"}),
            json.dumps(["list"]),
            "",
            json.dumps({"id": 7, "text": "Mild cardiomegaly."}),
            json.dumps({"id": "c", "text": ""}),
        ]) + "\n"
    )
    out = runner.invoke(app, ["parse-draft", "--jsonl", str(batch)])
    assert out.exit_code == 1
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["a", 7, "c"]
    assert lines[0]["labels"][0]["status"] == "absent"
    assert lines[1]["labels"][0]["label"] == "cardiomegaly"
    assert lines[2] == {"id": "c", "state": "none", "labels": []}
    errors = out.stderr.strip().splitlines()
    assert errors[0].startswith("error: line 2: not JSON")
    assert errors[1] == "error: line 3: no string 'text' field"
    assert errors[2] == "error: line 4: not a JSON object"
    assert errors[3] == "error: 3 bad line(s) skipped; 3 parsed"


def test_jsonl_all_good_exits_zero() -> None:
    lines = "".join(json.dumps({"id": i, "text": "No effusion."}) + "\n" for i in range(3))
    out = runner.invoke(app, ["parse-draft", "--jsonl", "-"], input=lines)
    assert out.exit_code == 0
    assert len(out.stdout.splitlines()) == 3


def test_unknown_parser_is_one_line(tmp_path: Path) -> None:
    out = runner.invoke(app, ["parse-draft", "--parser", "no-such-profile", "-"], input="No ptx.")
    assert out.exit_code == 2
    assert out.stderr.startswith("error: parser 'no-such-profile':")
    assert len(out.stderr.strip().splitlines()) == 1


def test_unreachable_model_parser_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: RulesDraftParser, text: str) -> None:
        raise BackendError("server at http://127.0.0.1:9/v1 failed after 4 attempts")

    monkeypatch.setattr(RulesDraftParser, "parse", refuse)
    out = runner.invoke(app, ["parse-draft", "-"], input="No ptx.")
    assert out.exit_code == 2
    assert out.stderr.strip() == (
        "error: parser 'rules': server at http://127.0.0.1:9/v1 failed after 4 attempts"
    )
