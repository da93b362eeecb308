"""A pydicom 3 decoding plugin: lossless and 12-bit JPEG through imagecodecs' libjpeg-turbo 3.

pydicom ships no plugin for imagecodecs; this module follows its plugin protocol (``is_available``,
``DECODER_DEPENDENCIES`` and a frame decoder taking ``(src, runner)``, see pydicom's "decoder
plugins" guide) and :mod:`dicom_agent.pixels` registers it under the label ``imagecodecs``.
libjpeg-turbo decodes a 2048 x 2048 12-bit lossless frame in about a fifth of the CPU time of the
gdcm and pylibjpeg-libjpeg plugins (``benchmarks/pixels.py``), and it reads 12-bit JPEG Extended
streams that pylibjpeg-libjpeg rejects and gdcm and Pillow do not support (pydicom's own test file
``JPEG-lossy.dcm``).

Only single-sample (grey) frames are handled: colour lossless JPEG is left to the other plugins,
whose colour-space handling pydicom already tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydicom import uid

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGExtended12Bit)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1.1",) for syntax in SYNTAXES}


def is_available(transfer_syntax: str) -> bool:
    """Whether imagecodecs is importable and built with a lossless-capable libjpeg-turbo."""
    if transfer_syntax not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    version = imagecodecs.jpeg8_version().split()[-1]  # e.g. "libjpeg_turbo 3.1.3/8.0"
    return bool(imagecodecs.JPEG8.available) and int(version.split(".")[0]) >= 3


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes | bytearray | memoryview:
    """One encoded frame -> its pixel words, in the layout pydicom's runner expects."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise ValueError("the imagecodecs plugin decodes single-sample frames only")
    arr = np.ascontiguousarray(imagecodecs.jpeg8_decode(src))
    # a precision-8 stream decodes to bytes even when Bits Allocated is 16; tell the runner, as
    # pydicom's own pylibjpeg plugin does
    runner.set_option("bits_allocated", arr.dtype.itemsize * 8)
    return arr.reshape(-1).view(np.uint8).data
