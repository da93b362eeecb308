"""Secondary Capture: the burned-in overlay in the source's study, own series, research marked."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cxr_auditor import render
from cxr_auditor.render import BoxStyle, render_overlay
from dicom_agent.errors import OutputError
from dicom_agent.outputs.common import contributing_equipment
from dicom_agent.outputs.sc import build_sc
from dicom_agent.outputs.validate import dciodvfy_errors, encode_validated
from tests.support.studies import Study, findings_result, make_study


def _sc(study: Study, picture: np.ndarray | None = None) -> Dataset:
    result = findings_result(study)
    if picture is None:
        picture = np.asarray(render_overlay(study.display[0].pixels, result, 0))
    sc = build_sc(
        picture,
        study.datasets[0],
        instance_number=1,
        sop_instance_uid="2.25.11",
        series_instance_uid="2.25.12",
        series_number=9903,
        contributing_equipment=contributing_equipment(result),
    )
    return pydicom.dcmread(BytesIO(encode_validated(sc)))


class TestBuildSC:
    def test_burned_in_picture_at_source_resolution(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, rows=600, cols=480)
        ds = _sc(study)
        assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (600, 480, 3)
        assert ds.PhotometricInterpretation == "RGB"
        assert ds.BurnedInAnnotation == "YES"
        pixels = ds.pixel_array
        assert tuple(pixels[2, 2]) == (170, 0, 0)  # the research banner's background
        # the urgent pneumothorax box edge (x0=60) is drawn in the urgent colour
        assert tuple(pixels[130, 60]) == render.COLOURS[BoxStyle.URGENT]
        # away from the annotations the picture is the windowed source, grey in all channels
        grey = study.display[0].pixels[300, 240]
        assert tuple(pixels[300, 240]) == (grey, grey, grey)

    def test_same_study_own_series_research_marked(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        ds = _sc(study)
        source = study.datasets[0]
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
        assert ds.SeriesNumber == 9903
        assert "RESEARCH USE ONLY" in ds.SeriesDescription
        assert ds.BodyPartExamined == "CHEST"
        assert ds.PatientID == source.PatientID
        assert list(ds.PatientOrientation) == list(source.PatientOrientation)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"

    def test_orientation_stays_empty_when_source_has_none(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, patient_orientation=None, pixel_spacing=None)
        ds = _sc(study)
        assert "PatientOrientation" in ds and not ds.PatientOrientation
        path = tmp_path / "sc.dcm"
        ds.save_as(path)
        assert dciodvfy_errors(path) == []

    def test_rejects_non_rgb_pictures(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        with pytest.raises(OutputError, match="rows x columns x 3"):
            _sc(study, picture=np.zeros((4, 4), np.uint8))
