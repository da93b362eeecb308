"""Tests for dicom_agent.pixels: the C.11 grey pipeline, frames, colour, decoders, geometry."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from cxr_auditor.schema import PixelBox
from dicom_agent._imagecodecs_plugin import decode_single_frame
from dicom_agent.errors import DicomInputError
from dicom_agent.pixels import (
    DisplayImage,
    ModelImage,
    decode_plugin_for,
    load_for_model,
    patient_left_on_image_right,
    read_dataset,
    to_display,
    to_model_input,
)
from tests.support.builders import (
    SENTINEL_PATIENT_ID,
    SENTINEL_PATIENT_NAME,
    colour_pattern,
    make_colour_sc,
    make_cxr,
    make_xa_run,
    save,
)
from tests.support.compress import VARIANTS, compress, have_dcmtk

needs_dcmtk = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk encoders not installed")


def row_image(
    values: list[int], *, signed: bool = False, bits_stored: int = 16, **attrs: object
) -> Dataset:
    """A 1 x N monochrome image holding exactly ``values`` (raw 16-bit words when given >= 0)."""
    ds = make_cxr(rows=1, cols=len(values), bits_stored=bits_stored)
    ds.PixelRepresentation = 1 if signed else 0
    words = np.array(values, dtype=np.int64) & 0xFFFF
    ds.PixelData = words.astype("<u2").tobytes()
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def greys(ds: Dataset) -> list[int]:
    return [int(v) for v in to_display(ds).pixels.ravel()]


# Expected greys below are worked by hand from PS3.3 C.11.2.1.2 with output range 0..255 and
# round-half-up, for centre 500, width 400.
class TestVoiFunctions:
    values = [300, 400, 500, 600, 700, 699, 301]

    def test_linear_matches_standard_formula(self) -> None:
        # y = ((x - 499.5) / 399 + 0.5) * 255; x <= 300 -> 0, x > 699 -> 255
        ds = row_image(self.values, WindowCenter=500, WindowWidth=400)
        assert greys(ds) == [0, 64, 128, 192, 255, 255, 1]

    def test_linear_exact_matches_standard_formula(self) -> None:
        # y = ((x - 500) / 400 + 0.5) * 255
        ds = row_image(
            self.values, WindowCenter=500, WindowWidth=400, VOILUTFunction="LINEAR_EXACT"
        )
        assert greys(ds) == [0, 64, 128, 191, 255, 254, 1]

    def test_sigmoid_matches_standard_formula(self) -> None:
        # y = 255 / (1 + exp(-4 (x - 500) / 400))
        ds = row_image(self.values, WindowCenter=500, WindowWidth=400, VOILUTFunction="SIGMOID")
        assert greys(ds) == [30, 69, 128, 186, 225, 224, 31]

    def test_first_of_several_windows_is_used(self) -> None:
        ds = row_image([300, 500, 700], WindowCenter=[500, 100], WindowWidth=[400, 10])
        display = to_display(ds)
        assert display.window == (500.0, 400.0)
        assert display.pixels.ravel().tolist() == [0, 128, 255]

    def test_unusable_header_window_falls_back_to_automatic(self) -> None:
        ds = row_image(list(range(0, 1000, 10)), WindowCenter=500, WindowWidth=0)
        display = to_display(ds)
        assert any("unusable" in n for n in display.notes)
        assert display.window is not None and display.window[1] > 0

    def test_width_one_linear_is_a_threshold(self) -> None:
        ds = row_image([99, 100, 101], WindowCenter=100.5, WindowWidth=1)
        assert greys(ds) == [0, 0, 255]


def _direct_grey(
    words: np.ndarray, bits: int, signed: bool, slope: float, intercept: float, c: float, w: float
) -> np.ndarray:
    """Per-pixel LINEAR_EXACT oracle straight from C.11 (no table), for the property below."""
    stored = words.astype(np.int64) & ((1 << bits) - 1)
    if signed:
        stored = np.where(stored >= 1 << (bits - 1), stored - (1 << bits), stored)
    x = stored * slope + intercept
    return np.clip(np.floor(((x - c) / w + 0.5) * 255.0 + 0.5), 0, 255).astype(np.uint8)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 16),
    signed=st.booleans(),
    slope=st.sampled_from([1.0, 0.5, 2.0, 3.25]),
    intercept=st.integers(-2000, 2000),
    center=st.floats(-3000, 3000),
    width=st.floats(1, 5000),
    seed=st.integers(0, 2**16),
)
def test_folded_table_equals_direct_evaluation(
    bits: int,
    signed: bool,
    slope: float,
    intercept: int,
    center: float,
    width: float,
    seed: int,
) -> None:
    """The one-table path (unused bits, sign, rescale, window) equals per-pixel evaluation."""
    words = np.random.default_rng(seed).integers(0, 1 << 16, size=64)  # junk in unused bits too
    ds = row_image(
        [int(v) for v in words],
        signed=signed,
        bits_stored=bits,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
        VOILUTFunction="LINEAR_EXACT",
    )
    expected = _direct_grey(words, bits, signed, slope, intercept, center, width)
    assert np.array_equal(to_display(ds).pixels.ravel(), expected)


class TestModalityLut:
    def test_rescale_with_negative_intercept(self) -> None:
        # modality = stored - 1024: -1024, -24, 976, 1976; LINEAR_EXACT c=0 w=2000
        ds = row_image(
            [0, 1000, 2000, 3000],
            RescaleSlope=1,
            RescaleIntercept=-1024,
            WindowCenter=0,
            WindowWidth=2000,
            VOILUTFunction="LINEAR_EXACT",
        )
        assert greys(ds) == [0, 124, 252, 255]

    def test_rescale_slope_applies_before_window(self) -> None:
        # modality = 2 * stored - 1000: -1000, 0, 1000
        ds = row_image(
            [0, 500, 1000],
            RescaleSlope=2,
            RescaleIntercept=-1000,
            WindowCenter=0,
            WindowWidth=2000,
            VOILUTFunction="LINEAR_EXACT",
        )
        assert greys(ds) == [0, 128, 255]

    def test_modality_lut_sequence(self) -> None:
        item = Dataset()
        item.LUTDescriptor = [3, 10, 16]
        item.LUTData = [100, 200, 300]
        item.ModalityLUTType = "US"
        ds = row_image(
            [9, 10, 11, 12, 13],
            ModalityLUTSequence=[item],
            WindowCenter=200,
            WindowWidth=200,
            VOILUTFunction="LINEAR_EXACT",
        )
        assert greys(ds) == [0, 0, 128, 255, 255]


class TestStoredValues:
    def test_signed_16_bit(self) -> None:
        ds = row_image(
            [-1000, -1, 0, 1000],
            signed=True,
            WindowCenter=0,
            WindowWidth=2000,
            VOILUTFunction="LINEAR_EXACT",
        )
        assert greys(ds) == [0, 127, 128, 255]

    def test_signed_12_bit_ignores_garbage_high_bits(self) -> None:
        # -2048 and -1 in 12-bit two's complement, with the 4 unused bits set to junk
        ds = row_image(
            [0x5800, 0xAFFF, 0x07FF],
            signed=True,
            bits_stored=12,
            WindowCenter=0,
            WindowWidth=4096,
            VOILUTFunction="LINEAR_EXACT",
        )
        # -2048 -> 0; -1 -> (-1/4096 + .5) * 255 = 127.44; 2047 -> 254.94
        assert greys(ds) == [0, 127, 255]

    def test_unsigned_12_bit_ignores_garbage_high_bits(self) -> None:
        ds = row_image(
            [0xF000, 0x3800, 0x1FFF],
            bits_stored=12,
            WindowCenter=2048,
            WindowWidth=4096,
            VOILUTFunction="LINEAR_EXACT",
        )
        # 0 -> 0; 2048 -> 127.5; 4095 -> 254.94
        assert greys(ds) == [0, 128, 255]

    def test_monochrome1_is_inverted(self) -> None:
        ds = row_image(
            [300, 400, 500, 600, 700],
            WindowCenter=500,
            WindowWidth=400,
            PhotometricInterpretation="MONOCHROME1",
        )
        display = to_display(ds)
        assert display.photometric == "MONOCHROME2"
        assert display.pixels.ravel().tolist() == [255, 191, 127, 63, 0]
        # the builder made this as MONOCHROME2, so its IDENTITY shape now contradicts
        assert any("IDENTITY contradicts MONOCHROME1" in n for n in display.notes)


class TestPaddingAndAutomaticWindow:
    def padded(self, **attrs: object) -> Dataset:
        rng = np.random.default_rng(3)
        body = rng.integers(1000, 2001, size=(64, 64))
        body[:, :26] = 4095  # 40 % padding, brighter than everything else
        ds = make_cxr(rows=64, cols=64)
        ds.PixelData = body.astype("<u2").tobytes()
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        return ds

    def test_padding_excluded_from_window_and_shown_black(self) -> None:
        display = to_display(self.padded(PixelPaddingValue=4095))
        assert display.window is not None
        center, width = display.window
        assert 995 <= center - width / 2 <= 1010 and 1990 <= center + width / 2 <= 2000
        assert (display.pixels[:, :26] == 0).all()
        assert display.pixels[:, 26:].mean() == pytest.approx(127.5, abs=6)

    def test_without_padding_value_the_window_spans_the_padding(self) -> None:
        display = to_display(self.padded())
        assert display.window is not None
        assert display.window[0] + display.window[1] / 2 == 4095

    def test_padding_range_limit(self) -> None:
        ds = self.padded(PixelPaddingValue=4095, PixelPaddingRangeLimit=1000)
        display = to_display(ds)
        assert (display.pixels == 0).all()


class TestVoiLutSequence:
    def test_8_bit_lut(self) -> None:
        item = Dataset()
        item.LUTDescriptor = [4, 100, 8]
        item.LUTData = [0, 50, 100, 255]
        ds = row_image([50, 100, 101, 102, 103, 200], VOILUTSequence=[item])
        display = to_display(ds)
        assert display.window is None
        assert display.pixels.ravel().tolist() == [0, 0, 50, 100, 255, 255]

    def test_12_bit_lut_is_scaled_and_preferred_over_window(self) -> None:
        item = Dataset()
        item.LUTDescriptor = [3, 0, 12]
        item.LUTData = [0, 2048, 4095]
        ds = row_image([0, 1, 2], VOILUTSequence=[item], WindowCenter=1, WindowWidth=1)
        # 2048 * 255 / 4095 = 127.53
        assert greys(ds) == [0, 128, 255]


class TestFrames:
    def test_rules_pick_first_middle_and_max_opacity(self) -> None:
        ds = make_xa_run(frames=8, peak_frame=5)
        assert to_display(ds, frame_rule="first").frame == 0
        assert to_display(ds, frame_rule="middle").frame == 4
        assert to_display(ds, frame_rule="max_opacity").frame == 5

    def test_max_opacity_follows_the_contrast_peak(self) -> None:
        assert to_display(make_xa_run(frames=6, peak_frame=2), frame_rule="max_opacity").frame == 2

    def test_explicit_frame_overrides_rule_and_renders_that_frame(self) -> None:
        ds = make_xa_run(frames=8, peak_frame=5)
        first, peak = to_display(ds, frame=0), to_display(ds, frame=5)
        assert peak.frame == 5
        assert (peak.pixels < 60).sum() > (first.pixels < 60).sum()

    def test_frame_out_of_range(self) -> None:
        with pytest.raises(DicomInputError, match="out of range"):
            to_display(make_xa_run(frames=3), frame=3)

    def test_single_frame_reports_no_frame(self) -> None:
        assert to_display(make_cxr(rows=32, cols=32)).frame is None

    def test_enhanced_shared_functional_group_window(self) -> None:
        ds = make_xa_run(frames=2)
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = 100, 50
        group = Dataset()
        group.FrameVOILUTSequence = [voi]
        ds.SharedFunctionalGroupsSequence = [group]
        assert to_display(ds).window == (100.0, 50.0)


class TestColour:
    @pytest.mark.parametrize(
        ("photometric", "tolerance"), [("RGB", 0), ("YBR_FULL", 1), ("YBR_FULL_422", 3)]
    )
    def test_converted_to_rgb(self, photometric: str, tolerance: int) -> None:
        display = to_display(make_colour_sc(photometric=photometric))
        assert display.photometric == "RGB" and display.pixels.dtype == np.uint8
        error = np.abs(display.pixels.astype(int) - colour_pattern(64, 96))
        assert error.max() <= tolerance

    def test_native_rgb_pixels_belong_to_the_caller(self) -> None:
        ds = make_colour_sc(photometric="RGB")
        before = bytes(ds.PixelData)
        display = to_display(ds)
        display.pixels[:] = 0
        assert ds.PixelData == before

    def test_jpeg_baseline_ybr_full_422(self, tmp_path: Path) -> None:
        if not have_dcmtk():
            pytest.skip("dcmtk encoders not installed")
        src = save(make_colour_sc(photometric="RGB"), tmp_path / "rgb.dcm")
        out = compress(src, "jpeg-baseline", tmp_path / "jpeg.dcm")
        assert read_dataset(out).PhotometricInterpretation == "YBR_FULL_422"
        display = to_display(read_dataset(out))
        assert np.abs(display.pixels.astype(int) - colour_pattern(64, 96)).mean() < 3


def test_debug_log_names_decisions_not_patients(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dicom_agent.pixels"):
        to_display(make_cxr(rows=16, cols=16, window=(2000, 3000)))
    assert "header window" in caplog.text
    for sentinel in (SENTINEL_PATIENT_NAME, SENTINEL_PATIENT_ID, "ACC0001"):
        assert sentinel not in caplog.text


class TestErrors:
    def test_missing_pixel_data(self) -> None:
        ds = make_cxr(rows=8, cols=8)
        del ds.PixelData
        with pytest.raises(DicomInputError, match="Pixel Data"):
            to_display(ds)

    @pytest.mark.parametrize(("rows", "cols"), [(0, 8), (65535, 65535)])
    def test_absurd_dimensions(self, rows: int, cols: int) -> None:
        ds = make_cxr(rows=8, cols=8)
        ds.Rows, ds.Columns = rows, cols
        with pytest.raises(DicomInputError, match="Rows x Columns"):
            to_display(ds)

    def test_unsupported_photometric(self) -> None:
        ds = make_colour_sc()
        ds.PhotometricInterpretation = "HSV"
        with pytest.raises(DicomInputError, match="Photometric"):
            to_display(ds)

    def test_truncated_pixel_data(self) -> None:
        ds = make_cxr(rows=8, cols=8)
        ds.PixelData = ds.PixelData[:10]
        with pytest.raises(DicomInputError):
            to_display(ds)

    def test_undecodable_compressed_data(self) -> None:
        ds = make_cxr(rows=8, cols=8)
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\xd8 not a codestream \xff\xd9"])
        with pytest.raises(DicomInputError, match="decode"):
            to_display(ds)

    def test_read_dataset_rejects_non_dicom(self, tmp_path: Path) -> None:
        junk = tmp_path / "junk.dcm"
        junk.write_bytes(b"not dicom at all")
        with pytest.raises(DicomInputError, match="junk.dcm"):
            read_dataset(junk)
        with pytest.raises(DicomInputError):
            read_dataset(tmp_path / "absent.dcm")


class TestDecoderPreference:
    def test_measured_preferences(self) -> None:
        assert decode_plugin_for(JPEGLSLossless) == "pyjpegls"
        assert decode_plugin_for(RLELossless) in {"pylibjpeg", "pydicom"}

    def test_lossless_jpeg_goes_to_our_libjpeg_turbo_plugin(self) -> None:
        assert decode_plugin_for(JPEGLosslessSV1) == "imagecodecs"
        assert "imagecodecs" in get_decoder(JPEGLosslessSV1).available_plugins

    @needs_dcmtk
    def test_colour_lossless_jpeg_falls_back_to_another_plugin(self, tmp_path: Path) -> None:
        # our plugin takes grey frames only; pydicom's own order must then decode the colour one
        src = save(make_colour_sc(photometric="RGB"), tmp_path / "rgb.dcm")
        out = compress(src, "jpeg-lossless-sv1", tmp_path / "sv1.dcm")
        display = to_display(read_dataset(out))
        assert np.array_equal(display.pixels, colour_pattern(64, 96))

    def test_12_bit_jpeg_that_libjpeg_rejects_still_renders(self) -> None:
        broken = get_testdata_file("JPEG-lossy.dcm", download=False)
        clean = get_testdata_file("JPGExtended.dcm", download=False)
        if broken is None or clean is None:
            pytest.skip("pydicom test files not installed")
        # same image; JPEG-lossy.dcm has a marker segment pylibjpeg-libjpeg refuses
        expected = to_display(read_dataset(Path(clean))).pixels
        assert np.array_equal(to_display(read_dataset(Path(broken))).pixels, expected)

    def test_native_and_unknown_syntaxes_let_pydicom_choose(self) -> None:
        assert decode_plugin_for(ExplicitVRLittleEndian) is None
        assert decode_plugin_for("1.2.3.4") is None


class TestDirectLosslessJpeg:
    """Single-frame grey lossless JPEG skips pydicom's runner; it must decode exactly alike."""

    @staticmethod
    def _lossless(tmp_path: Path) -> Dataset:
        src = save(make_cxr(rows=96, cols=80, window=(2000, 3000)), tmp_path / "src.dcm")
        return read_dataset(compress(src, "jpeg-lossless-sv1", tmp_path / "sv1.dcm"))

    @needs_dcmtk
    def test_same_words_as_pydicoms_runner(self, tmp_path: Path) -> None:
        ds = self._lossless(tmp_path)
        direct = decode_single_frame(ds.PixelData)
        runner = get_decoder(JPEGLosslessSV1).as_array(ds, decoding_plugin="imagecodecs")[0]
        assert direct.dtype == np.uint16
        assert np.array_equal(direct, runner)

    @needs_dcmtk
    def test_frame_split_over_fragments(self, tmp_path: Path) -> None:
        ds = self._lossless(tmp_path)
        expected = to_display(ds).pixels
        ds.PixelData = encapsulate([next(generate_frames(ds.PixelData))], fragments_per_frame=3)
        assert len(list(generate_fragments(ds.PixelData))) == 4  # offset table + 3 fragments
        assert np.array_equal(to_display(ds).pixels, expected)
        assert decode_single_frame(ds.PixelData).shape == (96, 80)

    @pytest.mark.parametrize(
        "pixel_data",
        [b"", b"\x00" * 16, b"\xfe\xff\x00\xe0\x00\x00\x00\x00", b"\xfe\xff\x00\xe0\xff\x00\x00\x00"],
        ids=["empty", "no-item-tag", "offset-table-only", "item-past-the-end"],
    )
    def test_malformed_encapsulation_is_refused(self, pixel_data: bytes) -> None:
        with pytest.raises(ValueError):
            decode_single_frame(pixel_data)

    def test_malformed_encapsulation_still_gives_a_clear_error(self) -> None:
        ds = make_cxr(rows=8, cols=8)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = b"\x00" * 16
        with pytest.raises(DicomInputError, match="decode"):
            to_display(ds)

    def test_8_bit_stream_in_16_bit_words_goes_through_pydicom(self) -> None:
        # libjpeg-turbo returns bytes for a precision-8 stream; pydicom's runner, not the direct
        # path, knows to read them as the 16-bit words the header declares
        import imagecodecs

        words = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(64, 48)
        native = make_cxr(rows=64, cols=48, bits_stored=8, window=(128, 256))
        native.PixelData = words.astype("<u2").tobytes()
        ds = make_cxr(rows=64, cols=48, bits_stored=8, window=(128, 256))
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(words, lossless=True)])
        assert decode_single_frame(ds.PixelData).dtype == np.uint8
        assert np.array_equal(to_display(ds).pixels, to_display(native).pixels)


class TestPatientOrientation:
    @pytest.mark.parametrize(
        ("orientation", "expected"),
        [
            ("L\\F", True),
            ("R\\F", False),
            ("LA\\F", True),
            ("A\\F", None),
            ("P\\H", None),
            (None, None),
        ],
    )
    def test_row_direction_decides(self, orientation: str | None, expected: bool | None) -> None:
        ds = make_cxr(rows=8, cols=8, patient_orientation=orientation)
        assert patient_left_on_image_right(ds) is expected


class TestModelInput:
    def test_letterbox_shape_padding_and_geometry(self) -> None:
        pixels = np.full((300, 200), 200, np.uint8)
        model = to_model_input(DisplayImage(pixels, "MONOCHROME2", None, None, ()), 96)
        assert isinstance(model, ModelImage)
        assert model.image.mode == "RGB" and model.image.size == (96, 96)
        g = model.geometry
        assert (g.content_left, g.content_top, g.content_width, g.content_height) == (16, 0, 64, 96)
        arr = np.asarray(model.image)
        assert (arr[:, :16] == 0).all() and (arr[:, 80:] == 0).all()
        assert (arr[:, 17:79] == 200).all()

    def test_known_box_maps_to_model_pixels_and_back(self) -> None:
        rows, cols, size = 2500, 3000, 896
        pixels = np.zeros((rows, cols), np.uint8)
        source_box = PixelBox(x0=900, y0=600, x1=1800, y1=1500)
        pixels[600:1500, 900:1800] = 255
        model = to_model_input(DisplayImage(pixels, "MONOCHROME2", None, None, ()), size)
        box = model.geometry.from_source(source_box)
        # where the bright block actually landed in the model image
        lit = np.argwhere(np.asarray(model.image)[..., 0] >= 128)
        (top, left), (bottom, right) = lit.min(axis=0), lit.max(axis=0) + 1
        assert abs(box.x0 * size - left) <= 1 and abs(box.x1 * size - right) <= 1
        assert abs(box.y0 * size - top) <= 1 and abs(box.y1 * size - bottom) <= 1
        back = model.geometry.to_source(box)
        assert back is not None
        for attr in ("x0", "y0", "x1", "y1"):
            assert abs(getattr(back, attr) - getattr(source_box, attr)) <= 1

    def test_colour_and_upscaling(self) -> None:
        display = to_display(make_colour_sc())
        model = to_model_input(display, 192)
        assert model.geometry.content_width == 192 and model.geometry.content_height == 128
        centre = np.asarray(model.image)[96, 96].astype(int)
        assert np.abs(centre - colour_pattern(64, 96)[32, 48]).max() <= 8

    def test_rejects_non_positive_size(self) -> None:
        with pytest.raises(ValueError, match="size"):
            blank = DisplayImage(np.zeros((4, 4), np.uint8), "MONOCHROME2", None, None, ())
            to_model_input(blank, 0)

    def test_load_for_model_from_file(self, tmp_path: Path) -> None:
        path = save(make_cxr(rows=120, cols=100, window=(2000, 3000)), tmp_path / "cxr.dcm")
        model = load_for_model(path, 64)
        assert model.image.size == (64, 64) and model.window == (2000.0, 3000.0)
        assert model.geometry.source_width == 100 and model.geometry.source_height == 120


@needs_dcmtk
class TestCompressedVariants:
    @pytest.mark.parametrize("variant", sorted(VARIANTS))
    def test_variant_decodes_like_the_source(self, variant: str, tmp_path: Path) -> None:
        bits = 8 if variant == "jpeg-baseline" else 12
        window = (128, 256) if bits == 8 else (2000, 3000)
        ds = make_cxr(rows=200, cols=160, bits_stored=bits, window=window)
        src = save(ds, tmp_path / "src.dcm")
        out = compress(src, variant, tmp_path / f"{variant}.dcm")
        expected = to_display(read_dataset(src)).pixels.astype(int)
        got = to_display(read_dataset(out)).pixels.astype(int)
        if VARIANTS[variant].lossless:
            assert np.array_equal(got, expected)
        else:
            assert np.abs(got - expected).mean() < 2

    @pytest.mark.parametrize("variant", ["jpeg-ls", "rle", "jpeg2000-lossless", "jpeg-lossless-sv1"])
    def test_signed_source_survives_lossless_compression(
        self, variant: str, tmp_path: Path
    ) -> None:
        ds = make_cxr(rows=64, cols=64, window=(0, 2000))
        ds.PixelRepresentation = 1
        values = np.random.default_rng(5).integers(-1500, 1500, size=(64, 64))
        ds.PixelData = values.astype("<i2").tobytes()
        src = save(ds, tmp_path / "signed.dcm")
        out = compress(src, variant, tmp_path / f"{variant}.dcm")
        expected = to_display(read_dataset(src)).pixels
        assert np.array_equal(to_display(read_dataset(out)).pixels, expected)


def _dcmtk_render(tool: str, path: Path, out: Path, *options: str) -> np.ndarray:
    subprocess.run([tool, *options, str(path), str(out)], check=True, capture_output=True)
    return np.asarray(Image.open(out)).astype(int)


@pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk not installed")
class TestAgainstDcmtk:
    """Same input, same window: our 8-bit image and dcmtk's agree within one grey level."""

    @pytest.mark.parametrize(
        ("attrs", "options"),
        [
            ({}, ("+Wi", "1")),
            ({}, ("+Ww", "1500", "900")),
            (
                {"PhotometricInterpretation": "MONOCHROME1", "PresentationLUTShape": "INVERSE"},
                ("+Wi", "1"),
            ),
            ({"RescaleIntercept": -1024, "WindowCenter": 900}, ("+Wi", "1")),
            ({"VOILUTFunction": "SIGMOID"}, ("+Wi", "1", "+Wfs")),
        ],
    )
    def test_window_agrees(
        self, attrs: dict[str, object], options: tuple[str, ...], tmp_path: Path
    ) -> None:
        ds = make_cxr(rows=256, cols=200, window=(2000, 3000))
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        src = save(ds, tmp_path / "src.dcm")
        theirs = _dcmtk_render("dcmj2pnm", src, tmp_path / "dcmtk.pgm", *options)
        if "+Ww" in options:
            ds.WindowCenter, ds.WindowWidth = float(options[1]), float(options[2])
        ours = to_display(ds).pixels.astype(int)
        assert ours.shape == theirs.shape
        assert (np.abs(ours - theirs) <= 1).mean() >= 0.999

    def test_jpeg_ls_input_agrees_with_dcml2pnm(self, tmp_path: Path) -> None:
        if shutil.which("dcml2pnm") is None or not have_dcmtk():
            pytest.skip("dcml2pnm not installed")
        src = save(make_cxr(rows=256, cols=200, window=(1800, 2500)), tmp_path / "src.dcm")
        jls = compress(src, "jpeg-ls", tmp_path / "jls.dcm")
        theirs = _dcmtk_render("dcml2pnm", jls, tmp_path / "dcmtk.pgm", "+Wi", "1")
        ours = to_display(read_dataset(jls)).pixels.astype(int)
        assert (np.abs(ours - theirs) <= 1).mean() >= 0.999


_CORPUS_SCRIPT = """
import json, sys
from pathlib import Path
import pydicom.data
from dicom_agent._imagecodecs_plugin import decode_single_frame
from dicom_agent.errors import DicomInputError
from dicom_agent.pixels import read_dataset, to_display
folders = [Path(pydicom.data.__file__).parent / "test_files"]
from pydicom.data.download import get_data_dir
folders.append(get_data_dir())
results = {}
for path in sorted(p for folder in folders for p in folder.glob("*.dcm")):
    try:
        display = to_display(read_dataset(path))
        results[path.name] = "ok" if display.pixels.dtype.name == "uint8" else "bad dtype"
    except DicomInputError:
        results[path.name] = "DicomInputError"
    except BaseException as exc:
        results[path.name] = type(exc).__name__
print(json.dumps(results))
"""


def test_pydicom_test_files_render_or_raise_dicom_input_error() -> None:
    """Each local pydicom test file gives an image or DicomInputError; the process survives."""
    proc = subprocess.run(
        [sys.executable, "-c", _CORPUS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) > 50
    assert {v for v in results.values()} <= {"ok", "DicomInputError"}, {
        k: v for k, v in results.items() if v not in ("ok", "DicomInputError")
    }
    # the images we must handle really do render
    must_render = (
        "CT_small.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_rle.dcm",
        "examples_palette.dcm",
    )
    for name in must_render:
        assert results[name] == "ok", name
