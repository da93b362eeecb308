"""GSPS: boxes as graphic layers coloured like the pictures, explicit VOI, research marking."""

from __future__ import annotations

import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from cxr_auditor import render
from cxr_auditor.render import BoxStyle
from dicom_agent.outputs.gsps import CONTENT_LABEL, build_gsps
from dicom_agent.outputs.validate import dciodvfy_errors, encode_validated
from tests.support.studies import Study, findings_result, make_study


def _gsps(study: Study, window: tuple[float, float] | None = (2000.0, 3000.0)) -> Dataset:
    gsps = build_gsps(
        findings_result(study),
        0,
        study.datasets[0],
        window=window,
        sop_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        series_number=9902,
    )
    return pydicom.dcmread(BytesIO(encode_validated(gsps)))


def _layer(ds: Dataset, name: str) -> Dataset:
    return next(a for a in ds.GraphicAnnotationSequence if a.GraphicLayer == name)


class TestBuildGSPS:
    def test_boxes_on_layers_with_the_picture_colours(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        ds = _gsps(study)
        layers = {layer.GraphicLayer: layer for layer in ds.GraphicLayerSequence}
        assert {"URGENT", "MISSING", "SUPPORTED", "FINDING", "AUDIT_TEXT"} <= set(layers)
        urgent_lab = layers["URGENT"].GraphicLayerRecommendedDisplayCIELabValue
        assert hd.color.CIELabColor.from_dicom_value(urgent_lab).to_rgb() == pytest.approx(
            render.COLOURS[BoxStyle.URGENT], abs=2
        )
        urgent = _layer(ds, "URGENT")
        (box,) = urgent.GraphicObjectSequence
        assert (box.GraphicType, box.GraphicAnnotationUnits, box.NumberOfGraphicPoints) == (
            "POLYLINE",
            "PIXEL",
            5,
        )
        points = np.array(box.GraphicData, dtype=float).reshape(5, 2)
        assert points[0] == pytest.approx(points[4])  # closed
        assert points[0] == pytest.approx([60.0, 70.0], abs=1.0)
        assert points[2] == pytest.approx([200.0, 190.0], abs=1.0)
        assert urgent.TextObjectSequence[0].UnformattedTextValue.startswith("Pneumothorax: URGENT")
        assert _layer(ds, "SUPPORTED").TextObjectSequence[0].UnformattedTextValue.startswith(
            "Effusion: in draft"
        )
        texts = [t.UnformattedTextValue for t in _layer(ds, "AUDIT_TEXT").TextObjectSequence]
        assert texts[0] == render.BANNER_TEXT
        assert any("Nodule/mass" in t and "not localised" in t for t in texts)

    def test_references_source_and_is_marked_research(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        ds = _gsps(study)
        ref = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == study.datasets[0].SOPInstanceUID
        assert ds.ContentLabel == CONTENT_LABEL
        assert "RESEARCH USE ONLY" in ds.ContentDescription
        assert "RESEARCH USE ONLY" in ds.SeriesDescription
        assert ds.BodyPartExamined == "CHEST"
        assert ds.StudyInstanceUID == study.study_uid

    def test_voi_window_is_the_display_window_with_one_explanation(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, window=(1500.0, 2500.0))
        voi = _gsps(study, window=(2000.0, 3000.0)).SoftcopyVOILUTSequence[0]
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2000.0, 3000.0)
        assert voi.WindowCenterWidthExplanation == "AI audit display window"  # not S\\Y\\N...

    def test_source_window_is_used_when_display_has_none(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, window=(1500.0, 2500.0))
        voi = _gsps(study, window=None).SoftcopyVOILUTSequence[0]
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (1500.0, 2500.0)

    def test_monochrome1_source_gets_inverse_presentation_lut(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, photometric="MONOCHROME1")
        assert _gsps(study).PresentationLUTShape == "INVERSE"
        assert _gsps(make_study(tmp_path / "m2")).PresentationLUTShape == "IDENTITY"

    @pytest.mark.skipif(shutil.which("dcmp2pgm") is None, reason="dcmtk dcmp2pgm not installed")
    @pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
    def test_dcmtk_renders_source_through_gsps_like_our_picture(
        self, tmp_path: Path, photometric: str
    ) -> None:
        """The presentation state reproduces the display window (and inversion) of the pictures."""
        study = make_study(tmp_path, photometric=photometric, rows=512, cols=480)
        display = study.display[0]
        gsps_path = tmp_path / "gsps.dcm"
        _gsps(study, window=display.window).save_as(gsps_path)
        rendered = tmp_path / "rendered.pgm"
        subprocess.run(
            ["dcmp2pgm", "--pstate", str(gsps_path), str(study.sources[0]), str(rendered)],
            check=True, capture_output=True, timeout=60,
        )
        diff = np.abs(np.asarray(Image.open(rendered)).astype(int) - display.pixels.astype(int))
        assert diff.max() <= 1
        assert display.pixels.std() > 10  # a real picture, not a flat one that matches anything

    def test_validates_with_dciodvfy(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        path = tmp_path / "gsps.dcm"
        _gsps(study).save_as(path)
        assert dciodvfy_errors(path) == []
