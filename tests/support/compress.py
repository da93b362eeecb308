"""Compressed variants of a saved test instance, made the way real modalities make them.

dcmtk encodes JPEG-LS (``dcmcjpls``), JPEG lossless and baseline (``dcmcjpeg``) and RLE
(``dcmcrle``); dcmtk has no JPEG 2000 encoder, so pydicom's pylibjpeg-openjpeg plugin makes those,
and pydicom's writer makes Deflated Explicit VR Little Endian.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)


@dataclass(frozen=True)
class Variant:
    """One way to compress: the resulting transfer syntax and the dcmtk command, if any."""

    transfer_syntax: UID
    lossless: bool
    dcmtk: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    "jpeg-ls": Variant(JPEGLSLossless, True, ("dcmcjpls", "+el")),
    "jpeg-ls-near": Variant(JPEGLSNearLossless, False, ("dcmcjpls", "+en", "+md", "2")),
    "jpeg-lossless-sv1": Variant(JPEGLosslessSV1, True, ("dcmcjpeg", "+e1")),
    "jpeg-lossless": Variant(JPEGLossless, True, ("dcmcjpeg", "+el", "+sv", "6")),
    # Baseline is 8-bit only: feed it 8-bit sources.
    "jpeg-baseline": Variant(JPEGBaseline8Bit, False, ("dcmcjpeg", "+eb", "+q", "95")),
    "jpeg-extended": Variant(JPEGExtended12Bit, False, ("dcmcjpeg", "+ee", "+q", "95")),
    "rle": Variant(RLELossless, True, ("dcmcrle",)),
    "jpeg2000-lossless": Variant(JPEG2000Lossless, True),
    "deflate": Variant(DeflatedExplicitVRLittleEndian, True),
}


def have_dcmtk() -> bool:
    """Whether the dcmtk encoders are on PATH."""
    return all(shutil.which(tool) for tool in ("dcmcjpls", "dcmcjpeg", "dcmcrle"))


def compress(src: Path, variant: str, dst: Path) -> Path:
    """Write ``src`` (an uncompressed Part 10 file) to ``dst`` in the named variant's syntax."""
    spec = VARIANTS[variant]
    dst.parent.mkdir(parents=True, exist_ok=True)
    if spec.dcmtk:
        subprocess.run([*spec.dcmtk, str(src), str(dst)], check=True, capture_output=True)
    elif spec.transfer_syntax == DeflatedExplicitVRLittleEndian:
        ds = pydicom.dcmread(src)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(dst, enforce_file_format=True)
    else:
        ds = pydicom.dcmread(src)
        ds.compress(spec.transfer_syntax, encoding_plugin="pylibjpeg")
        ds.save_as(dst, enforce_file_format=True)
    written = pydicom.dcmread(dst, stop_before_pixels=True)
    if written.file_meta.TransferSyntaxUID != spec.transfer_syntax:
        raise RuntimeError(f"{variant}: wrote {written.file_meta.TransferSyntaxUID}")
    return dst
