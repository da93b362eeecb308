"""``cxr-agent resend``: re-queue and send a study's latest results."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from dicom_agent.cli import app
from dicom_agent.config import load_settings
from dicom_agent.outputs.writer import write_outputs
from dicom_agent.state import JobKind, StateDB
from tests.conftest import free_port
from tests.support.storescp import Receiver
from tests.support.studies import findings_result, make_study

runner = CliRunner()


def _config(tmp_path: Path, port: int, research: bool = True) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "paths": {"out": str(tmp_path / "out"), "state": str(tmp_path / "state.sqlite3")},
                "forward": {
                    "destinations": [
                        {
                            "name": "research",
                            "ae_title": "RESEARCHPACS",
                            "host": "127.0.0.1",
                            "port": port,
                            "research": research,
                        }
                    ]
                },
            }
        )
    )
    return path


def _audited_study(tmp_path: Path, config: Path) -> str:
    settings = load_settings(config)
    study = make_study(tmp_path)
    study.study_dir = settings.paths.out / study.study_uid
    write_outputs(
        findings_result(study),
        sources=study.sources,
        display=study.display,
        study_dir=study.study_dir,
        settings=settings,
    )
    return study.study_uid


class TestResend:
    def test_sends_latest_objects_to_research_destination(self, tmp_path: Path) -> None:
        scp = Receiver(free_port()).start()
        try:
            config = _config(tmp_path, scp.port)
            study_uid = _audited_study(tmp_path, config)
            outcome = runner.invoke(app, ["resend", study_uid, "--config", str(config)])
        finally:
            scp.stop()
        assert outcome.exit_code == 0, outcome.output
        assert "delivered to 1 destination" in outcome.output
        assert len(scp.received) == 3
        assert {str(ds.StudyInstanceUID) for ds in scp.received} == {study_uid}

    def test_failure_exits_1_and_keeps_retry_queued(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        study_uid = _audited_study(tmp_path, config)
        outcome = runner.invoke(app, ["resend", study_uid, "--config", str(config)])
        assert outcome.exit_code == 1
        assert "retries stay queued" in outcome.output
        (job,) = StateDB(tmp_path / "state.sqlite3").jobs(kind=JobKind.FORWARD)
        assert (job.state, job.attempts) == ("queued", 1)

    def test_refuses_without_research_destination(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port(), research=False)
        study_uid = _audited_study(tmp_path, config)
        outcome = runner.invoke(app, ["resend", study_uid, "--config", str(config)])
        assert outcome.exit_code == 2
        assert "research: true" in outcome.output

    def test_unknown_study_and_bad_uid_are_one_line_errors(self, tmp_path: Path) -> None:
        config = _config(tmp_path, free_port())
        outcome = runner.invoke(app, ["resend", "1.2.3", "--config", str(config)])
        assert outcome.exit_code == 2
        assert "no readable audit.json" in outcome.output
        outcome = runner.invoke(app, ["resend", "../etc", "--config", str(config)])
        assert outcome.exit_code == 2
        assert "must be a DICOM UID" in outcome.output
