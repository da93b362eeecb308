"""The JSON sidecar: versioned, never silently overwritten, latest never regressed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_agent.errors import OutputError
from dicom_agent.outputs.layout import read_result
from dicom_agent.outputs.sidecar import write_sidecar
from tests.support.studies import findings_result, make_study, no_finding_result


class TestSidecar:
    def test_writes_version_and_latest_with_disclaimer(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        result = findings_result(study)
        path = write_sidecar(tmp_path / "s", result)
        assert path == tmp_path / "s" / "v1" / "audit.json"
        assert read_result(path) == result
        assert "RESEARCH USE ONLY" in (tmp_path / "s" / "audit.json").read_text()
        assert not list((tmp_path / "s").rglob(".*.tmp"))  # no temp files left behind

    def test_rewrite_of_same_audit_is_allowed_other_content_refused(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        result = findings_result(study)
        write_sidecar(tmp_path / "s", result)
        write_sidecar(tmp_path / "s", result.model_copy(update={"timings": {"model_ms": 3.0}}))
        with pytest.raises(OutputError, match="already exists with different content"):
            write_sidecar(tmp_path / "s", no_finding_result(study))

    def test_older_version_does_not_replace_latest(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        write_sidecar(tmp_path / "s", findings_result(study, version=3))
        write_sidecar(tmp_path / "s", findings_result(study, version=2))
        assert read_result(tmp_path / "s" / "audit.json").result_version == 3
        assert read_result(tmp_path / "s" / "v2" / "audit.json").result_version == 2

    def test_unreadable_sidecar_is_an_output_error(self, tmp_path: Path) -> None:
        bad = tmp_path / "audit.json"
        bad.write_text("{not json")
        with pytest.raises(OutputError, match="not a readable AuditResult"):
            read_result(bad)
