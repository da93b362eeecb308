"""Run-time validation: round trip, SR re-read; and the external validators' wrappers."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_agent.errors import OutputError
from dicom_agent.outputs.validate import dciodvfy_errors, dsrdump_tree, encode_validated
from tests.support.builders import make_cxr, save


class TestEncodeValidated:
    def test_returns_part10_bytes_of_a_good_image(self) -> None:
        data = encode_validated(make_cxr(rows=64, cols=64))
        assert data[128:132] == b"DICM"

    def test_missing_identity_is_refused(self) -> None:
        ds = make_cxr(rows=64, cols=64)
        del ds.SeriesInstanceUID
        with pytest.raises(OutputError, match="SeriesInstanceUID"):
            encode_validated(ds)

    def test_truncated_pixel_data_is_refused(self) -> None:
        ds = make_cxr(rows=64, cols=64)
        ds.PixelData = ds.PixelData[:100]
        with pytest.raises(OutputError, match="does not decode"):
            encode_validated(ds)

    def test_sr_class_without_a_tid1500_tree_is_refused(self) -> None:
        ds = make_cxr(rows=64, cols=64)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        with pytest.raises(OutputError):
            encode_validated(ds)


class TestExternalValidators:
    def test_dciodvfy_reports_error_lines(self, tmp_path: Path) -> None:
        ds = make_cxr(rows=64, cols=64, window=(2000.0, 4000.0))  # a DX for presentation needs VOI
        assert dciodvfy_errors(save(ds, tmp_path / "ok.dcm")) == []
        del ds.Modality  # Type 1 in General Series
        assert any("Modality" in line for line in dciodvfy_errors(save(ds, tmp_path / "bad.dcm")))

    def test_dsrdump_refuses_a_non_sr(self, tmp_path: Path) -> None:
        with pytest.raises(OutputError, match="dsrdump could not render"):
            dsrdump_tree(save(make_cxr(rows=64, cols=64), tmp_path / "img.dcm"))


