"""DICOM instance -> display-ready 8-bit pixels -> the model's letterboxed input.

The grey-scale path follows the standard's pipeline (PS3.3 C.11, PS3.4 N.2): stored value ->
Modality LUT (rescale or Modality LUT Sequence, C.11.1) -> VOI LUT (window centre/width with the
LINEAR / LINEAR_EXACT / SIGMOID functions of C.11.2.1.2, or a VOI LUT Sequence) -> MONOCHROME1
inversion (C.7.6.3.1.2). Pixel Padding Value / Pixel Padding Range Limit (C.7.5.1.1.2) are masked
to black and kept out of the automatic window.

Speed comes from folding that whole chain into **one lookup table indexed by the raw stored word**
(for Bits Allocated 8 and 16): the table also removes unused high bits and sign-extends Pixel
Representation 1 values (two's complement in Bits Stored bits, PS3.5 8.1.1), so a frame is
converted by a single ``lut[words]`` gather and pydicom is asked for the raw words
(``correct_unused_bits=False``, ``view_only=True`` for native syntaxes: no copy, no shifts).

Decoders: pydicom 3 picks among its plugins; :func:`decode_plugin_for` holds the per-syntax
preference measured by ``benchmarks/pixels.py`` (see ``docs/benchmarks.md``). If the preferred
plugin fails on a file, pydicom's default order is tried before giving up.

Multi-frame rule (``frame_rule``), frame indices are 0-based:

* ``first`` -- frame 0; ``middle`` -- frame ``n // 2``.
* ``max_opacity`` -- for contrast runs (XA/XRF): every frame is displayed through one common grey
  transform (the header window, else a percentile window pooled over all frames); the threshold is
  the 5th percentile of the pooled display greys, and the frame with the most pixels at or below it
  (darkest = most contrast-filled in MONOCHROME2 display sense) wins; ties go to the earliest.

Every failure of :func:`to_display` and :func:`read_dataset` is a :class:`DicomInputError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cxr_auditor.geometry import Geometry
from dicom_agent import _imagecodecs_plugin
from dicom_agent.errors import DicomInputError

__all__ = [
    "DisplayImage",
    "FrameRule",
    "ModelImage",
    "decode_plugin_for",
    "load_for_model",
    "patient_left_on_image_right",
    "read_dataset",
    "to_display",
    "to_model_input",
]

logger = logging.getLogger(__name__)

FrameRule = Literal["first", "middle", "max_opacity"]

# Preferred pydicom decoding plugin per transfer syntax, measured on the team machine by
# benchmarks/pixels.py (decode ms of 3000x2500 and 2048x2048 radiographs; table and command in
# docs/benchmarks.md). Syntaxes not listed use pydicom's own order. "imagecodecs" is our plugin
# (dicom_agent._imagecodecs_plugin, registered below): libjpeg-turbo 3 for lossless and 12-bit JPEG.
DECODER_PREFERENCE: dict[str, str] = {
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEGLossless: _imagecodecs_plugin.LABEL,
    JPEGLosslessSV1: _imagecodecs_plugin.LABEL,
    JPEGBaseline8Bit: "pillow",
    JPEGExtended12Bit: _imagecodecs_plugin.LABEL,
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
    RLELossless: "pylibjpeg",
}

for _syntax in _imagecodecs_plugin.SYNTAXES:
    # add_plugin refuses a label twice (a re-imported module); the first registration stands
    with contextlib.suppress(ValueError):
        get_decoder(_syntax).add_plugin(
            _imagecodecs_plugin.LABEL, (_imagecodecs_plugin.__name__, "decode_frame")
        )

# A frame larger than this (8192 x 8192) is not a radiograph; refuse it before allocating.
MAX_FRAME_PIXELS = 1 << 26
# Automatic VOI window when the header gives none: these percentiles of the non-padding
# modality values (robust to collimator edges and burnt-in labels).
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
# The automatic window and the max-opacity rule look at a strided subsample of about this many
# pixels.
_SAMPLE_PIXELS = 1 << 18
# Max-opacity rule: grey threshold = this percentile of the pooled display greys of all frames.
_OPACITY_PERCENTILE = 5.0
# Letterbox resize: Pillow first shrinks by a whole factor with a box filter (``reduce``) as long
# as at least this much reduction is left for the BILINEAR pass. For a 3000 x 2500 radiograph to
# 896 that takes the resize from 11.6 to 7.2 ms at 0.70 instead of 0.57 mean grey levels from
# Lanczos (BOX alone: 0.77); measured by benchmarks/pixels.py, table in docs/benchmarks.md.
RESIZE_REDUCING_GAP = 1.5
# Pixels per block of the table gather (64 Ki: the intp indices stay in L2 cache).
_GATHER_BLOCK = 1 << 16
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")

_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class DisplayImage:
    """Display-ready pixels at source resolution.

    ``pixels`` is uint8, rows x cols for grey (already windowed and in MONOCHROME2 sense, so
    ``photometric`` is ``"MONOCHROME2"``) or rows x cols x 3 for colour (``"RGB"``). ``frame`` is
    the 0-based frame index for multi-frame instances, None for single-frame ones. ``window`` is
    the (centre, width) applied, in modality units; None for a VOI LUT Sequence or colour.
    ``notes`` are short decision records (never patient data). Compared by identity: the
    fields hold arrays.
    """

    pixels: np.ndarray
    photometric: str
    frame: int | None
    window: tuple[float, float] | None
    notes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class ModelImage:
    """The model's square RGB input and where the source sits inside it."""

    image: Image.Image
    geometry: Geometry
    frame: int | None
    window: tuple[float, float] | None
    notes: tuple[str, ...]


def read_dataset(path: Path) -> Dataset:
    """Read a whole DICOM Part 10 file (pixels included)."""
    try:
        return pydicom.dcmread(path)
    except Exception as exc:
        raise DicomInputError(
            f"cannot read {path.name} as DICOM: {type(exc).__name__}: {exc}"
        ) from exc


def decode_plugin_for(transfer_syntax_uid: str) -> str | None:
    """The measured preferred decoding plugin for a transfer syntax, if it is installed here.

    None means "let pydicom choose" (native syntaxes, unknown syntaxes, or the preferred plugin
    missing from this environment).
    """
    preferred = DECODER_PREFERENCE.get(transfer_syntax_uid)
    if preferred is None:
        return None
    try:
        available = get_decoder(UID(transfer_syntax_uid)).available_plugins
    except NotImplementedError:
        return None
    return preferred if preferred in available else None


def patient_left_on_image_right(ds: Dataset) -> bool | None:
    """Whether the patient's left side is on the right of the displayed image.

    PS3.3 C.7.6.1.1.1: Patient Orientation (0020,0020) gives the patient direction of the row
    (increasing column index, left to right across the image) and then of the column; within a
    value the first letter is the principal direction. A row direction of ``L`` (standard PA
    display, ``L\\F``) puts the patient's left on the image right; ``R`` puts it on the image left.
    Anything else (absent, malformed, or a row running A/P/H/F as in a lateral) gives None: no side
    is assumed, even for a frontal chest.
    """
    value = ds.get("PatientOrientation")
    if value is None:
        return None
    parts = [value] if isinstance(value, str) else list(value)
    if len(parts) != 2 or not str(parts[0]):
        return None
    principal = str(parts[0]).strip().upper()[:1]
    return {"L": True, "R": False}.get(principal)


def to_display(
    ds: Dataset,
    *,
    frame: int | None = None,
    frame_rule: FrameRule = "first",
) -> DisplayImage:
    """Decode one frame and render it to display-ready 8-bit pixels.

    ``frame`` (0-based) overrides ``frame_rule`` (see the module docstring for the rules).
    Raises :class:`DicomInputError` for anything that cannot be rendered: missing Pixel Data,
    absurd dimensions, unsupported photometric interpretation or transfer syntax, undecodable data.
    """
    try:
        display = _to_display(ds, frame, frame_rule)
    except DicomInputError:
        raise
    except Exception as exc:
        raise DicomInputError(f"pixel conversion failed: {type(exc).__name__}: {exc}") from exc
    logger.debug(
        "rendered %s frame %s to %s: %s",
        "x".join(str(n) for n in display.pixels.shape),
        display.frame,
        display.photometric,
        "; ".join(display.notes),
    )
    return display


def to_model_input(display: DisplayImage, size: int) -> ModelImage:
    """Aspect-preserving resize into a centred ``size`` x ``size`` RGB letterbox (padding 0).

    The content is resized to whole pixels (long side exactly ``size``) with Pillow's BILINEAR
    filter, whose support widens with the reduction factor (a true triangle-filter antialias, not
    point sampling), after a whole-factor box reduction for large reductions
    (``RESIZE_REDUCING_GAP``). BILINEAR is the filter MedGemma's own image processor uses, and
    against Lanczos the result differs by under one grey level on average while taking a fifth of
    the time (measured in ``benchmarks/pixels.py``). The returned :class:`Geometry` is the exact integer content
    rectangle, so it differs from :meth:`Geometry.letterbox` by under half a pixel on the short
    side and maps boxes back without that error.
    """
    if size <= 0:
        raise ValueError(f"argument 'size' must be a positive integer, got {size}")
    rows, cols = display.pixels.shape[:2]
    scale = size / max(rows, cols)
    content_w = min(size, max(1, round(cols * scale)))
    content_h = min(size, max(1, round(rows * scale)))
    left, top = (size - content_w) // 2, (size - content_h) // 2
    source = Image.fromarray(display.pixels)
    if (content_w, content_h) != (cols, rows):
        source = source.resize(
            (content_w, content_h), Image.Resampling.BILINEAR, reducing_gap=RESIZE_REDUCING_GAP
        )
    canvas = Image.new("RGB", (size, size), 0)
    canvas.paste(source.convert("RGB"), (left, top))
    geometry = Geometry(
        source_width=cols,
        source_height=rows,
        input_width=size,
        input_height=size,
        content_left=left,
        content_top=top,
        content_width=content_w,
        content_height=content_h,
    )
    return ModelImage(
        image=canvas,
        geometry=geometry,
        frame=display.frame,
        window=display.window,
        notes=display.notes,
    )


def load_for_model(path: Path, size: int, *, frame_rule: FrameRule = "first") -> ModelImage:
    """Read, render and letterbox one instance for the model."""
    return to_model_input(to_display(read_dataset(path), frame_rule=frame_rule), size)


# --- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelModule:
    """The Image Pixel module attributes (PS3.3 C.7.6.3) that drive rendering."""

    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    transfer_syntax: UID

    @classmethod
    def from_dataset(cls, ds: Dataset) -> _PixelModule:
        if "PixelData" not in ds:
            raise DicomInputError("missing Pixel Data (7FE0,0010)")
        missing = [
            kw
            for kw in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
            if ds.get(kw) in (None, "")
        ]
        if missing:
            raise DicomInputError(f"missing Image Pixel attribute(s): {', '.join(missing)}")
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if tsuid is None:
            raise DicomInputError("missing Transfer Syntax UID (0002,0010) in the file meta")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows <= 0 or cols <= 0 or rows * cols > MAX_FRAME_PIXELS:
            raise DicomInputError(
                f"Rows x Columns must be between 1 and {MAX_FRAME_PIXELS} pixels, "
                f"got {rows} x {cols}"
            )
        bits_allocated = int(ds.BitsAllocated)
        if bits_allocated not in (1, 8, 16, 32):
            raise DicomInputError(f"Bits Allocated must be 1, 8, 16 or 32, got {bits_allocated}")
        bits_stored = int(ds.get("BitsStored") or bits_allocated)
        if not 1 <= bits_stored <= bits_allocated:
            raise DicomInputError(
                f"Bits Stored must be between 1 and Bits Allocated ({bits_allocated}), "
                f"got {bits_stored}"
            )
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames < 1:
            raise DicomInputError(f"Number of Frames must be at least 1, got {frames}")
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        samples = int(ds.get("SamplesPerPixel") or 1)
        if (samples, photometric) not in {(1, p) for p in (*_MONOCHROME, "PALETTE COLOR")} | {
            (3, p) for p in _COLOUR
        }:
            raise DicomInputError(
                f"unsupported Photometric Interpretation {photometric!r} with {samples} sample(s) "
                f"per pixel (supported: {', '.join((*_MONOCHROME, 'PALETTE COLOR', *_COLOUR))})"
            )
        return cls(
            rows=rows,
            cols=cols,
            frames=frames,
            samples=samples,
            bits_allocated=bits_allocated,
            bits_stored=bits_stored,
            signed=int(ds.get("PixelRepresentation") or 0) == 1,
            photometric=photometric,
            transfer_syntax=UID(str(tsuid)),
        )

    def stored_values(self, words: np.ndarray) -> np.ndarray:
        """Raw unsigned words -> stored values (unused high bits dropped, sign extended)."""
        values = words.astype(np.int64) & ((1 << self.bits_stored) - 1)
        if self.signed:
            half = 1 << (self.bits_stored - 1)
            values = np.where(values >= half, values - (half << 1), values)
        return values

    def word(self, value: int) -> int:
        """A header value in pixel units (US or SS, possibly read either way) as a raw word."""
        return int(value) & ((1 << max(self.bits_allocated, 8)) - 1)


def _with_fallback(plugin: str | None, call: Callable[[str], _T]) -> _T:
    """Run ``call`` with the preferred plugin; if it fails, once more with pydicom's default."""
    if plugin is None:
        return call("")
    try:
        return call(plugin)
    except Exception as exc:
        logger.debug("decoding plugin %s failed (%s); retrying with pydicom's order", plugin, exc)
        return call("")


def _decode_options(pm: _PixelModule) -> dict[str, Any]:
    # Raw words only: the grey LUT drops unused bits and sign-extends, so pydicom's shifts are
    # wasted passes; for native syntaxes a read-only view on Pixel Data avoids a copy.
    return {
        "correct_unused_bits": False,
        "view_only": not pm.transfer_syntax.is_encapsulated,
        "as_rgb": True,
    }


def _decoder(pm: _PixelModule) -> Any:
    try:
        return get_decoder(pm.transfer_syntax)
    except NotImplementedError as exc:
        raise DicomInputError(
            f"unsupported Transfer Syntax {pm.transfer_syntax.name} ({pm.transfer_syntax})"
        ) from exc


def _decode_frame(ds: Dataset, pm: _PixelModule, index: int) -> tuple[np.ndarray, str]:
    """One frame's raw array and the photometric interpretation pydicom left it in."""
    plugin = decode_plugin_for(pm.transfer_syntax)
    if plugin == _imagecodecs_plugin.LABEL and pm.frames == 1 and pm.samples == 1:
        arr = _decode_single_frame_directly(ds, pm)
        if arr is not None:
            return arr, pm.photometric
    decoder = _decoder(pm)
    try:
        arr, meta = _with_fallback(
            plugin,
            lambda name: decoder.as_array(
                ds, index=index, decoding_plugin=name, **_decode_options(pm)
            ),
        )
    except Exception as exc:
        raise DicomInputError(
            f"cannot decode frame {index} ({pm.transfer_syntax.name}): {type(exc).__name__}: {exc}"
        ) from exc
    return arr, str(meta.get("photometric_interpretation", pm.photometric))


def _decode_single_frame_directly(ds: Dataset, pm: _PixelModule) -> np.ndarray | None:
    """The grey frame of a single-frame lossless JPEG without pydicom's runner, or None.

    None (pydicom's path decides, with its own error) when the data is not plain encapsulated
    JPEG, or when the decoded words disagree with Rows, Columns or Bits Allocated, e.g. an 8-bit
    stream in 16-bit words, whose layout pydicom's runner knows how to fix.
    """
    try:
        arr = _imagecodecs_plugin.decode_single_frame(ds.PixelData)
    except Exception as exc:
        logger.debug("direct lossless JPEG decode failed (%s); using pydicom's path", exc)
        return None
    if arr.shape != (pm.rows, pm.cols) or arr.dtype.itemsize * 8 != pm.bits_allocated:
        return None
    return arr


def _frame_samples(ds: Dataset, pm: _PixelModule, step: int) -> list[tuple[np.ndarray, str]]:
    """A strided subsample of every frame with its decoded photometric (max-opacity rule)."""
    decoder = _decoder(pm)

    def run(name: str) -> list[tuple[np.ndarray, str]]:
        return [
            (
                np.ascontiguousarray(arr[::step, ::step]),
                str(meta.get("photometric_interpretation", pm.photometric)),
            )
            for arr, meta in decoder.iter_array(ds, decoding_plugin=name, **_decode_options(pm))
        ]

    try:
        return _with_fallback(decode_plugin_for(pm.transfer_syntax), run)
    except Exception as exc:
        raise DicomInputError(
            f"cannot decode frames ({pm.transfer_syntax.name}): {type(exc).__name__}: {exc}"
        ) from exc


# --- grey-scale pipeline ----------------------------------------------------------------------


def _functional_item(ds: Dataset, frame: int | None, sequence: str) -> Dataset:
    """The dataset holding a frame's ``sequence`` attributes: per-frame, shared, else top level.

    Enhanced multi-frame objects carry rescale and window in functional groups (PS3.3 C.7.6.16).
    """
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        seq = group.get(sequence)
        if seq:
            return seq[0]
    return ds


def _lut_item(item: Dataset, little_endian: bool, signed: bool) -> tuple[int, np.ndarray, int]:
    """(first mapped value, entries, bits per entry) of a Modality or VOI LUT item (C.11.1.1)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 1 << 16
    if signed and first >= 1 << 15:  # descriptor read as US although pixels are signed
        first -= 1 << 16
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        data = np.frombuffer(raw, dtype="<u2" if little_endian else ">u2")
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    if data.size < entries:
        raise DicomInputError(
            f"LUT Data has {data.size} entries, LUT Descriptor announces {entries}"
        )
    return first, data[:entries].astype(np.float64), bits


def _apply_lut(values: np.ndarray, first: int, data: np.ndarray) -> np.ndarray:
    """Values below the first mapped value take the first entry, above the range the last."""
    index = np.clip(np.rint(values - first), 0, data.size - 1).astype(np.intp)
    return data[index]


def _linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, output 0..255 as float (width >= 1)."""
    if width <= 1:
        return np.where(x <= center - 0.5, 0.0, 255.0)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(y, 0.0, 255.0)


def _linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 LINEAR_EXACT window, output 0..255 as float (width > 0)."""
    return np.clip(((x - center) / width + 0.5) * 255.0, 0.0, 255.0)


def _sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 SIGMOID window, output 0..255 as float (width > 0)."""
    return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


_VOI_FUNCTIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "LINEAR": _linear,
    "LINEAR_EXACT": _linear_exact,
    "SIGMOID": _sigmoid,
}


@dataclass(frozen=True)
class _GreyTransform:
    """Stored word -> display grey, the whole C.11 chain for one frame."""

    pm: _PixelModule
    modality: Callable[[np.ndarray], np.ndarray]
    voi: Callable[[np.ndarray], np.ndarray]
    invert: bool
    padding: tuple[int, int] | None  # inclusive range of stored values

    def greys(self, words: np.ndarray) -> np.ndarray:
        stored = self.pm.stored_values(words)
        grey = np.floor(self.voi(self.modality(stored)) + 0.5)
        out = np.clip(grey, 0, 255).astype(np.uint8)
        if self.invert:
            out = 255 - out
        if self.padding is not None:
            out[(stored >= self.padding[0]) & (stored <= self.padding[1])] = 0
        return out

    def render(self, frame: np.ndarray) -> np.ndarray:
        """Apply to a decoded frame: one gather through a per-word table for words <= 16 bit."""
        unsigned = frame.view(f"u{frame.dtype.itemsize}")
        if frame.dtype.itemsize > 2:
            return self.greys(unsigned)
        table = self.greys(np.arange(1 << (8 * frame.dtype.itemsize), dtype=unsigned.dtype))
        return _gather(table, unsigned)


def _gather(table: np.ndarray, words: np.ndarray) -> np.ndarray:
    """``table[words]`` for unsigned words that all index the table, in blocks.

    numpy casts the indices to intp first; doing that per cache-sized block into one reused buffer
    instead of per image, and skipping the bounds check (``mode="clip"``: every word of the
    table's width is an index) keeps it to a few ms for 7.5 Mpx against about 17 ms for plain
    ``table[words]`` (``benchmarks/pixels.py --stages`` gives the window stage's current cost).
    """
    flat = np.ascontiguousarray(words).reshape(-1)
    out = np.empty(flat.size, dtype=table.dtype)
    indices = np.empty(min(_GATHER_BLOCK, flat.size), dtype=np.intp)
    for start in range(0, flat.size, _GATHER_BLOCK):
        stop = min(start + _GATHER_BLOCK, flat.size)
        block = indices[: stop - start]
        np.copyto(block, flat[start:stop], casting="unsafe")
        np.take(table, block, out=out[start:stop], mode="clip")
    return out.reshape(words.shape)


def _modality_transform(
    ds: Dataset, pm: _PixelModule, frame: int | None, notes: list[str]
) -> Callable[[np.ndarray], np.ndarray]:
    """PS3.3 C.11.1: Modality LUT Sequence, else Rescale Slope/Intercept, else identity."""
    item = _functional_item(ds, frame, "PixelValueTransformationSequence")
    if ds.get("ModalityLUTSequence"):
        first, data, _ = _lut_item(ds.ModalityLUTSequence[0], _little_endian(ds), pm.signed)
        notes.append("modality: LUT sequence")
        return lambda v: _apply_lut(v, first, data)
    if item.get("RescaleSlope") is not None or item.get("RescaleIntercept") is not None:
        slope = float(item.get("RescaleSlope") or 1.0)
        intercept = float(item.get("RescaleIntercept") or 0.0)
        if (slope, intercept) != (1.0, 0.0):
            notes.append(f"modality: rescale slope {slope:g} intercept {intercept:g}")
        return lambda v: v * slope + intercept
    return lambda v: v.astype(np.float64)


def _padding_range(ds: Dataset, pm: _PixelModule) -> tuple[int, int] | None:
    """PS3.3 C.7.5.1.1.2: Pixel Padding Value, up to Pixel Padding Range Limit if present."""
    value = ds.get("PixelPaddingValue")
    if value is None or value == "":
        return None
    ends = [value, ds.get("PixelPaddingRangeLimit", value)]
    lo, hi = sorted(int(pm.stored_values(np.array([pm.word(v)]))[0]) for v in ends)
    return lo, hi


def _little_endian(ds: Dataset) -> bool:
    encoding = getattr(ds, "original_encoding", (None, None))
    return encoding[1] is not False


def _subsample(frame: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(math.sqrt(frame.shape[0] * frame.shape[1] / _SAMPLE_PIXELS)))
    return frame[::step, ::step]


def _auto_window(
    samples: list[np.ndarray],
    pm: _PixelModule,
    modality: Callable[[np.ndarray], np.ndarray],
    padding: tuple[int, int] | None,
) -> tuple[float, float]:
    """Percentile window (centre, width) over non-padding modality values of ``samples``."""
    words = np.concatenate([s.view(f"u{s.dtype.itemsize}").ravel() for s in samples])
    uniq, counts = np.unique(words, return_counts=True)
    stored = pm.stored_values(uniq)
    if padding is not None:
        keep = (stored < padding[0]) | (stored > padding[1])
        stored, counts = stored[keep], counts[keep]
    if stored.size == 0:
        return 0.5, 1.0
    values = modality(stored)
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(counts[order])
    lo_q, hi_q = (p / 100.0 * cumulative[-1] for p in AUTO_WINDOW_PERCENTILES)
    lo = float(values[min(np.searchsorted(cumulative, lo_q), values.size - 1)])
    hi = float(values[min(np.searchsorted(cumulative, hi_q), values.size - 1)])
    return (lo + hi) / 2.0, max(hi - lo, 1e-6)


def _grey_transform(
    ds: Dataset,
    pm: _PixelModule,
    frame: int | None,
    samples: list[np.ndarray],
    notes: list[str],
) -> tuple[_GreyTransform, tuple[float, float] | None]:
    """Build the C.11 chain; ``samples`` (strided subsamples) feed the automatic window."""
    modality = _modality_transform(ds, pm, frame, notes)
    padding = _padding_range(ds, pm)
    if padding is not None:
        notes.append("padding: masked")
    voi_item = _functional_item(ds, frame, "FrameVOILUTSequence")
    window: tuple[float, float] | None = None
    voi: Callable[[np.ndarray], np.ndarray]
    if ds.get("VOILUTSequence"):
        # Preferred over a window when both are present, as pydicom's apply_voi_lut does: for
        # "for presentation" radiographs the LUT is the manufacturer's intended rendering.
        first, data, bits = _lut_item(ds.VOILUTSequence[0], _little_endian(ds), pm.signed)
        top = float(max((1 << bits) - 1, data.max(initial=1.0)))
        notes.append("voi: LUT sequence")
        voi = lambda v: _apply_lut(v, first, data) * (255.0 / top)  # noqa: E731
    else:
        header = _header_window(voi_item, notes)
        if header is not None:
            window, function = header
        else:
            window, function = _auto_window(samples, pm, modality, padding), "LINEAR_EXACT"
            notes.append(
                "voi: automatic window (percentiles {:g}-{:g}, padding excluded)".format(
                    *AUTO_WINDOW_PERCENTILES
                )
            )
        center, width = window
        shape = _VOI_FUNCTIONS[function]
        voi = lambda v: shape(v, center, width)  # noqa: E731
    invert = pm.photometric == "MONOCHROME1"
    if invert:
        notes.append("inverted: MONOCHROME1")
    # C.8.11.1.1.1 pairs INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2, so the shape
    # adds nothing; a contradicting shape is a writer bug and the photometric wins.
    shape_name = str(ds.get("PresentationLUTShape") or "").strip().upper()
    if shape_name in ("IDENTITY", "INVERSE") and (shape_name == "INVERSE") != invert:
        notes.append(f"presentation LUT shape {shape_name} contradicts {pm.photometric}; ignored")
    return _GreyTransform(pm, modality, voi, invert, padding), window


def _first_number(value: object) -> float:
    """The first of a possibly multi-valued DS (several windows may be offered; C.11.2.1.2)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _header_window(item: Dataset, notes: list[str]) -> tuple[tuple[float, float], str] | None:
    """The first Window Center/Width pair and its VOI LUT Function, if usable (C.11.2.1.2)."""
    if item.get("WindowCenter") in (None, "") or item.get("WindowWidth") in (None, ""):
        return None

    center, width = _first_number(item.WindowCenter), _first_number(item.WindowWidth)
    function = str(item.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        notes.append(f"voi: unknown VOI LUT Function {function!r}, LINEAR used")
        function = "LINEAR"
    minimum = 1.0 if function == "LINEAR" else 0.0
    if not math.isfinite(center) or not math.isfinite(width) or width < minimum or width == 0:
        notes.append("voi: header window unusable, automatic window used")
        return None
    notes.append(f"voi: header window, {function}")
    return (center, width), function


# --- colour -----------------------------------------------------------------------------------


def _colour_pixels(ds: Dataset, pm: _PixelModule, arr: np.ndarray, photometric: str) -> np.ndarray:
    """Decoded colour frame -> uint8 RGB (pydicom already converted YBR_FULL/422 to RGB)."""
    if pm.photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pm.stored_values(arr.view(f"u{arr.dtype.itemsize}")), ds)
        return (rgb >> 8).astype(np.uint8) if rgb.dtype.itemsize > 1 else rgb.astype(np.uint8)
    if photometric != "RGB":
        raise DicomInputError(f"cannot convert {photometric} colour pixels to RGB")
    if arr.dtype == np.uint8:
        return arr
    top = (1 << pm.bits_stored) - 1
    return np.rint((arr.astype(np.int64) & top) * (255.0 / top)).astype(np.uint8)


# --- frame choice and assembly -----------------------------------------------------------------


def _choose_frame(
    ds: Dataset, pm: _PixelModule, frame: int | None, rule: FrameRule, notes: list[str]
) -> int | None:
    if pm.frames == 1:
        if frame not in (None, 0):
            raise DicomInputError(f"frame {frame} requested from a single-frame instance")
        return None
    if frame is not None:
        if not 0 <= frame < pm.frames:
            raise DicomInputError(f"frame {frame} out of range 0..{pm.frames - 1}")
        notes.append(f"frame: {frame} of {pm.frames} (requested)")
        return frame
    if rule == "first":
        chosen = 0
    elif rule == "middle":
        chosen = pm.frames // 2
    elif rule == "max_opacity":
        chosen = _max_opacity_frame(ds, pm)
    else:
        raise DicomInputError(f"frame_rule must be first, middle or max_opacity, got {rule!r}")
    notes.append(f"frame: {chosen} of {pm.frames} by rule {rule}")
    return chosen


def _max_opacity_frame(ds: Dataset, pm: _PixelModule) -> int:
    """The frame with the most pixels at or below the pooled 5th-percentile display grey."""
    step = max(1, math.ceil(math.sqrt(pm.rows * pm.cols * pm.frames / _SAMPLE_PIXELS)))
    decoded = _frame_samples(ds, pm, step)
    samples = [s for s, _ in decoded]
    if pm.samples == 1 and pm.photometric in _MONOCHROME:
        transform, _ = _grey_transform(ds, pm, None, samples, [])
        greys = [transform.greys(s.view(f"u{s.dtype.itemsize}")) for s in samples]
    else:
        greys = [_colour_pixels(ds, pm, s, photometric).mean(axis=-1) for s, photometric in decoded]
    threshold = np.percentile(np.concatenate([g.ravel() for g in greys]), _OPACITY_PERCENTILE)
    dark = [int(np.count_nonzero(g <= threshold)) for g in greys]
    return int(np.argmax(dark))


def _to_display(ds: Dataset, frame: int | None, rule: FrameRule) -> DisplayImage:
    pm = _PixelModule.from_dataset(ds)
    notes: list[str] = []
    chosen = _choose_frame(ds, pm, frame, rule, notes)
    arr, photometric = _decode_frame(ds, pm, 0 if chosen is None else chosen)
    if arr.shape[:2] != (pm.rows, pm.cols):
        raise DicomInputError(
            f"decoded frame is {arr.shape[0]} x {arr.shape[1]}, header says {pm.rows} x {pm.cols}"
        )
    if pm.samples == 1 and pm.photometric in _MONOCHROME:
        transform, window = _grey_transform(ds, pm, chosen, [_subsample(arr)], notes)
        pixels = transform.render(arr)
        return DisplayImage(pixels, "MONOCHROME2", chosen, window, tuple(notes))
    # native RGB may come back as a read-only view on the dataset's Pixel Data: give callers
    # their own C-ordered array
    pixels = np.require(_colour_pixels(ds, pm, arr, photometric), requirements=["C", "W"])
    if pm.photometric != "RGB":
        notes.append(f"colour: {pm.photometric} converted to RGB")
    return DisplayImage(pixels, "RGB", chosen, None, tuple(notes))
