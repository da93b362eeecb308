"""write_outputs end to end: every object of a result version, validated by dicom3tools and dcmtk."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from cxr_auditor.schema import AuditResult
from dicom_agent.config import AgentSettings
from dicom_agent.errors import OutputError
from dicom_agent.outputs import validate
from dicom_agent.outputs.layout import objects_to_send, read_result
from dicom_agent.outputs.validate import dciodvfy_errors, dsrdump_tree
from dicom_agent.outputs.writer import write_outputs
from tests.support.builders import SENTINEL_PATIENT_ID, SENTINEL_PATIENT_NAME
from tests.support.studies import (
    DRAFT,
    Study,
    failed_result,
    findings_result,
    make_study,
    no_finding_result,
    unsupported_result,
)

SCENARIOS: dict[str, Callable[[Study], AuditResult]] = {
    "findings": findings_result,
    "grounding_failed": failed_result,
    "no_finding": no_finding_result,
    "unsupported": unsupported_result,
}
# Measurement groups each scenario must produce (boxes + image-level groups).
EXPECTED_GROUPS = {
    "findings": (2, 1),
    "grounding_failed": (0, 1),
    "no_finding": (0, 1),
    "unsupported": (1, 1),
}


def _write(study: Study, result: AuditResult, settings: AgentSettings) -> AuditResult:
    return write_outputs(
        result,
        sources=study.sources,
        display=study.display,
        study_dir=study.study_dir,
        settings=settings,
    )


def _assert_valid(paths: list[Path]) -> None:
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
        if path.name == "sr.dcm":
            assert "Imaging Measurement Report" in dsrdump_tree(path)


class TestWriteOutputs:
    @pytest.mark.parametrize("scenario", sorted(SCENARIOS))
    def test_writes_four_validated_objects(
        self, scenario: str, tmp_path: Path, settings: AgentSettings
    ) -> None:
        study = make_study(tmp_path)
        result = _write(study, SCENARIOS[scenario](study), settings)

        assert set(result.outputs) == {"sr", "gsps:0", "sc:0"}
        folder = study.study_dir / "v1"
        assert sorted(p.name for p in folder.iterdir()) == [
            "audit.json",
            "gsps-0.dcm",
            "overlay-0.png",
            "sc-0.dcm",
            "sr.dcm",
        ]
        sent = objects_to_send(study.study_dir, result)
        assert [p.name for p in sent] == ["sr.dcm", "gsps-0.dcm", "sc-0.dcm"]
        _assert_valid(sent)
        for path in sent:
            ds = pydicom.dcmread(path)
            assert ds.SOPInstanceUID in result.outputs.values()
            assert ds.StudyInstanceUID == study.study_uid
            assert "RESEARCH USE ONLY" in ds.SeriesDescription
        report = hd.sr.srread(folder / "sr.dcm").content
        boxes, image_level = EXPECTED_GROUPS[scenario]
        assert len(report.get_planar_roi_measurement_groups()) == boxes
        assert len(report.get_image_measurement_groups()) == image_level
        assert read_result(study.study_dir / "audit.json") == result
        assert read_result(folder / "audit.json").outputs == result.outputs

    def test_reaudit_references_predecessor_and_keeps_old_version(
        self, tmp_path: Path, settings: AgentSettings
    ) -> None:
        study = make_study(tmp_path)
        first = _write(study, findings_result(study, version=1), settings)
        second = _write(study, findings_result(study, version=2), settings)

        assert set(first.outputs.values()).isdisjoint(second.outputs.values())
        assert (study.study_dir / "v1" / "sr.dcm").exists()
        assert (study.study_dir / "v2" / "overlay-0.png").exists()
        assert read_result(study.study_dir / "v1" / "audit.json").result_version == 1
        assert read_result(study.study_dir / "audit.json").result_version == 2
        sr = pydicom.dcmread(study.study_dir / "v2" / "sr.dcm")
        old = pydicom.dcmread(study.study_dir / "v1" / "sr.dcm")
        predecessor = sr.PredecessorDocumentsSequence[0]
        assert predecessor.StudyInstanceUID == study.study_uid
        ref_series = predecessor.ReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID == old.SeriesInstanceUID
        assert ref_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.outputs["sr"]
        assert sr.SeriesInstanceUID == old.SeriesInstanceUID  # one research SR series per study
        assert sr.InstanceNumber == 2
        _assert_valid(objects_to_send(study.study_dir, second))

    def test_same_inputs_give_identical_uids(self, tmp_path: Path, settings: AgentSettings) -> None:
        study = make_study(tmp_path)
        result = findings_result(study)
        first = _write(study, result, settings)
        rerun = result.model_copy(update={"timings": {"model_ms": 99.0}})
        first_dir = study.study_dir
        study.study_dir = tmp_path / "elsewhere"
        second = _write(study, rerun, settings)

        assert first.outputs == second.outputs
        for name in ("sr.dcm", "gsps-0.dcm", "sc-0.dcm"):
            a = pydicom.dcmread(first_dir / "v1" / name, stop_before_pixels=True)
            b = pydicom.dcmread(study.study_dir / "v1" / name, stop_before_pixels=True)
            assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)

    def test_rewriting_a_version_with_other_content_is_refused(
        self, tmp_path: Path, settings: AgentSettings
    ) -> None:
        study = make_study(tmp_path)
        _write(study, findings_result(study), settings)
        with pytest.raises(OutputError, match="version 1 already exists"):
            _write(study, no_finding_result(study), settings)
        assert read_result(study.study_dir / "audit.json").grounding.findings[0].label.value == (
            "pleural_effusion"
        )

    def test_invalid_object_goes_to_failed_and_is_not_sent(
        self, tmp_path: Path, settings: AgentSettings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken_sc(*args: object, **kwargs: object) -> None:
            raise OutputError("secondary capture could not be built: synthetic failure")

        monkeypatch.setattr("dicom_agent.outputs.writer.build_sc", broken_sc)
        study = make_study(tmp_path)
        result = _write(study, findings_result(study), settings)

        assert set(result.outputs) == {"sr", "gsps:0"}
        reason = study.study_dir / "failed" / "v1-sc-0.dcm.reason.txt"
        assert "synthetic failure" in reason.read_text()
        assert not (study.study_dir / "v1" / "sc-0.dcm").exists()
        assert [p.name for p in objects_to_send(study.study_dir, result)] == ["sr.dcm", "gsps-0.dcm"]

    def test_object_failing_validation_is_kept_in_failed_with_reason(
        self, tmp_path: Path, settings: AgentSettings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real = validate.encode_validated

        def refuse_gsps(ds: pydicom.Dataset) -> bytes:
            if ds.Modality == "PR":
                raise OutputError("SeriesInstanceUID missing or changed after the round trip")
            return real(ds)

        monkeypatch.setattr("dicom_agent.outputs.writer.encode_validated", refuse_gsps)
        study = make_study(tmp_path)
        result = _write(study, findings_result(study), settings)

        assert set(result.outputs) == {"sr", "sc:0"}
        failed = study.study_dir / "failed"
        assert sorted(p.name for p in failed.iterdir()) == ["v1-gsps-0.dcm", "v1-gsps-0.dcm.reason.txt"]
        assert pydicom.dcmread(failed / "v1-gsps-0.dcm").Modality == "PR"
        assert "round trip" in (failed / "v1-gsps-0.dcm.reason.txt").read_text()

    def test_unreadable_source_is_an_output_error(self, tmp_path: Path, settings: AgentSettings) -> None:
        study = make_study(tmp_path)
        study.sources[0].write_bytes(b"not dicom")
        with pytest.raises(OutputError, match="0.dcm cannot be read"):
            _write(study, findings_result(study), settings)
        assert not study.study_dir.exists()

    def test_disabled_outputs_are_not_written(self, tmp_path: Path, settings: AgentSettings) -> None:
        settings.outputs.gsps = False
        settings.outputs.secondary_capture = False
        settings.outputs.overlay_png = False
        study = make_study(tmp_path)
        result = _write(study, findings_result(study), settings)
        assert set(result.outputs) == {"sr"}
        assert sorted(p.name for p in (study.study_dir / "v1").iterdir()) == ["audit.json", "sr.dcm"]

    def test_two_images_get_one_sr_and_objects_per_image(
        self, tmp_path: Path, settings: AgentSettings
    ) -> None:
        study = make_study(tmp_path, images=2)
        result = _write(study, no_finding_result(study), settings)
        assert set(result.outputs) == {"sr", "gsps:0", "sc:0", "gsps:1", "sc:1"}
        sr = hd.sr.srread(study.study_dir / "v1" / "sr.dcm")
        evidence = {
            item.ReferencedSOPInstanceUID
            for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert evidence == {str(ds.SOPInstanceUID) for ds in study.datasets.values()}

    def test_no_phi_or_draft_text_in_logs(
        self, tmp_path: Path, settings: AgentSettings, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="dicom_agent")
        study = make_study(tmp_path, patient_orientation=None, pixel_spacing=None)
        first = _write(study, findings_result(study), settings)
        (study.study_dir / "v1" / "sr.dcm").unlink()
        _write(study, findings_result(study, version=2), settings)
        assert first.outputs
        messages = [r.getMessage() for r in caplog.records]
        assert "SR of result version 1 not found; no predecessor reference" in messages
        for secret in (SENTINEL_PATIENT_NAME, SENTINEL_PATIENT_ID, "ACC0001", DRAFT, "pleural effusion"):
            assert secret not in caplog.text
