"""The out/ layout and result versions: folder names, a re-run that differs gets a new version."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_agent.config import AgentSettings
from dicom_agent.outputs.layout import free_version, study_dir
from dicom_agent.outputs.sidecar import write_sidecar
from tests.support.studies import findings_result, make_study, no_finding_result


@pytest.mark.parametrize("uid", ["../etc", "1.2/3", "", "1.2.x"])
def test_study_dir_refuses_what_is_not_a_uid(settings: AgentSettings, uid: str) -> None:
    with pytest.raises(ValueError, match="not usable as a folder name"):
        study_dir(settings, uid)


def test_study_dir_is_the_uid_under_paths_out(settings: AgentSettings) -> None:
    assert study_dir(settings, "1.2.840.1") == settings.paths.out / "1.2.840.1"


class TestFreeVersion:
    def test_rerun_of_the_same_audit_keeps_its_version(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        result = findings_result(study)
        write_sidecar(tmp_path / "s", result)
        asked: list[int] = []
        rerun = result.model_copy(update={"timings": {"model_ms": 5.0}})
        assert free_version(tmp_path / "s", rerun, lambda n: asked.append(n) or n) is rerun
        assert asked == []

    def test_rerun_with_other_content_moves_past_the_highest_version_on_disk(
        self, tmp_path: Path
    ) -> None:
        study = make_study(tmp_path)
        write_sidecar(tmp_path / "s", findings_result(study, version=1))
        write_sidecar(tmp_path / "s", findings_result(study, version=4))
        other = no_finding_result(study)  # version 1, different findings
        asked: list[int] = []
        moved = free_version(tmp_path / "s", other, lambda n: asked.append(n) or n + 2)
        assert asked == [5]  # one past v4
        assert moved.result_version == 7  # what the job table answered
        assert moved.grounding == other.grounding
