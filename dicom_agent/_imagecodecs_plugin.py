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

import struct
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


_ITEM = struct.Struct("<HHL")  # (FFFE,xxxx) item tag and 32-bit length, PS3.5 A.4
_ITEM_TAG, _SEQUENCE_DELIMITER = 0xE000, 0xE0DD


def decode_single_frame(pixel_data: bytes) -> np.ndarray:
    """The one frame of an encapsulated single-frame Pixel Data value, decoded from its fragments.

    PS3.5 A.4: the value is a Basic Offset Table item, then the fragments of the frame, then an
    optional sequence delimiter. The fragments are handed to libjpeg-turbo as views (one fragment,
    the usual case, is not copied), which skips pydicom's frame reassembly and output copy: 47.7
    instead of 52.2 ms for a 3000 x 2500 lossless radiograph (``benchmarks/pixels.py --stages``).
    Raises ValueError for
    anything that is not well-formed encapsulated data, so the caller can fall back to pydicom.
    """
    import imagecodecs

    view = memoryview(pixel_data)
    fragments: list[memoryview] = []
    pos, first = 0, True
    while pos + _ITEM.size <= len(view):
        group, element, length = _ITEM.unpack_from(view, pos)
        if group != 0xFFFE or element not in (_ITEM_TAG, _SEQUENCE_DELIMITER):
            raise ValueError(f"no item tag at offset {pos} of the encapsulated Pixel Data")
        if element == _SEQUENCE_DELIMITER:
            break
        start, pos = pos + _ITEM.size, pos + _ITEM.size + length
        if pos > len(view):
            raise ValueError("an encapsulated Pixel Data item runs past the end of the value")
        if not first:  # the first item is the Basic Offset Table
            fragments.append(view[start:pos])
        first = False
    if not fragments:
        raise ValueError("the encapsulated Pixel Data holds no fragment")
    stream = fragments[0] if len(fragments) == 1 else b"".join(fragments)
    return np.asarray(imagecodecs.jpeg8_decode(stream))
