"""A corpus of hostile DICOM inputs derived from one valid synthetic radiograph.

Each :class:`Mutation` is a complete PS3.10 file whose File Meta Information (group 0002) is
intact, so a C-STORE SCU can send the dataset bytes *exactly as mutated* (pynetdicom's
``STORE_SEND_CHUNKED_DATASET`` mode sends the bytes after the file meta without decoding
them; see :func:`send_raw`). The damage lives in the dataset: truncations, wrong element
lengths, wrong VRs, missing or absurd pixel attributes, false transfer-syntax claims, non-CXR
modalities, UIDs that are not UIDs (PS3.5 §9.1) and UIDs shaped like paths.

The corpus is generated in the test run, never committed, and carries the sentinel identity of
:mod:`tests.support.builders`, so log-leak checks cover these inputs too.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from tests.support.builders import (
    SENTINEL_BIRTH_DATE,
    SENTINEL_PATIENT_ID,
    SENTINEL_PATIENT_NAME,
    make_cxr,
)

# (0028,0010) Rows, (0028,0011) Columns, (0010,0010) PatientName, (7FE0,0010) PixelData as
# they appear in Explicit VR Little Endian (PS3.5 §7.1.2): group, element, VR[, reserved], length.
_ROWS_TAG = b"\x28\x00\x10\x00"
_COLUMNS_TAG = b"\x28\x00\x11\x00"
_NAME_TAG = b"\x10\x00\x10\x00"
_PIXEL_TAG = b"\xe0\x7f\x10\x00"


@dataclass(frozen=True)
class Mutation:
    """One hostile input: a PS3.10 file and what the sender claims about it.

    ``sop_class_uid``, ``sop_instance_uid`` and ``transfer_syntax_uid`` are the values of the
    file meta, which a chunked SCU puts in the C-STORE request and uses to pick the
    presentation context; the dataset itself may disagree with them (that is the point).
    """

    name: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    why: str = field(default="", compare=False)

    def write(self, folder: Path) -> Path:
        """Write the file as ``<folder>/<name>.dcm`` and return its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.dcm"
        path.write_bytes(self.data)
        return path


def encode(ds: Dataset, *, meta_ts: str | None = None) -> bytes:
    """PS3.10 bytes of ``ds``; ``meta_ts`` overrides the transfer syntax the file meta claims.

    The dataset is always encoded in ``ds.file_meta.TransferSyntaxUID``; only the claim changes.
    """
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if meta_ts is None:
        return data
    return _replace_meta_ts(data, ds.file_meta.TransferSyntaxUID, meta_ts)


def dataset_offset(data: bytes) -> int:
    """Offset of the first byte after the File Meta Information group (PS3.10 §7.1)."""
    # 128-byte preamble, "DICM", then (0002,0000) UL group length whose value counts the rest.
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a PS3.10 file with a group length")
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


def _replace_meta_ts(data: bytes, old: str, new: str) -> bytes:
    """Rewrite (0002,0010) in the file meta, fixing its length and the group length."""

    def pad(uid: str) -> bytes:
        raw = uid.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    old_el = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(pad(old))) + pad(old)
    new_el = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(pad(new))) + pad(new)
    end = dataset_offset(data)
    meta = data[144:end]
    if old_el not in meta:
        raise ValueError("transfer syntax element not found in the file meta")
    meta = meta.replace(old_el, new_el, 1)
    return data[:140] + struct.pack("<I", len(meta)) + meta + data[end:]


@contextlib.contextmanager
def lenient_pydicom() -> Iterator[None]:
    """pydicom without value validation: the invalid values here are written on purpose.

    Assignment validates with the *reading* mode and encoding with the writing mode.
    """
    settings = pydicom_config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def _find(data: bytes, tag: bytes) -> int:
    start = dataset_offset(data)
    pos = data.find(tag, start)
    if pos < 0:
        raise ValueError(f"tag {tag.hex()} not found in the dataset")
    return pos


def _patch(data: bytes, pos: int, new: bytes) -> bytes:
    return data[:pos] + new + data[pos + len(new) :]


def _base(**kw: object) -> Dataset:
    """Small valid DX image; each mutation starts from a fresh one with its own UIDs."""
    args: dict[str, object] = {"rows": 64, "cols": 64}
    args.update(kw)
    ds = make_cxr(**args)  # type: ignore[arg-type]
    # The byte patches below assume Explicit VR Little Endian element headers.
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise AssertionError("make_cxr no longer writes Explicit VR Little Endian")
    return ds


def _mutation(name: str, ds: Dataset, data: bytes, why: str) -> Mutation:
    meta = ds.file_meta
    return Mutation(
        name=name,
        data=data,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=_meta_ts_of(data),
        why=why,
    )


def _meta_ts_of(data: bytes) -> str:
    meta = data[144 : dataset_offset(data)]
    pos = meta.find(b"\x02\x00\x10\x00UI")
    (length,) = struct.unpack("<H", meta[pos + 6 : pos + 8])
    return meta[pos + 8 : pos + 8 + length].rstrip(b"\x00").decode("ascii")


# -- the individual mutations ---------------------------------------------------------------


def _truncations() -> Iterator[Mutation]:
    for label, keep in (("after_meta", 0), ("mid_header", 40), ("mid_pixels", None)):
        ds = _base()
        data = encode(ds)
        start = dataset_offset(data)
        cut = start + keep if keep is not None else (start + len(data)) // 2 + 64
        yield _mutation(
            f"truncated_{label}", ds, data[:cut], "dataset cut short (PS3.5 §7 element stream)"
        )


# (name, element tag + VR, offset of its length field, new length, why): lengths that lie.
_BAD_LENGTHS = (
    ("name_length_overruns", _NAME_TAG + b"PN", 6, struct.pack("<H", 0xFFFE),
     "PN length runs past the following elements"),
    ("name_length_odd", _NAME_TAG + b"PN", 6, struct.pack("<H", 3),
     "odd value length (PS3.5 §7.1.1 requires even)"),
    ("pixel_length_huge", _PIXEL_TAG + b"OW", 8, struct.pack("<I", 0xFFFFFFF0),
     "Pixel Data claims ~4 GiB (memory bomb attempt)"),
    ("pixel_length_short", _PIXEL_TAG + b"OW", 8, struct.pack("<I", 100),
     "Pixel Data shorter than Rows x Columns x 2, trailing bytes look like elements"),
)


def _wrong_lengths() -> Iterator[Mutation]:
    for name, element, offset, length, why in _BAD_LENGTHS:
        ds = _base()
        data = encode(ds)
        yield _mutation(name, ds, _patch(data, _find(data, element) + offset, length), why)


def _wrong_vrs() -> Iterator[Mutation]:
    ds = _base()
    data = encode(ds)
    pos = _find(data, _ROWS_TAG + b"US")
    yield _mutation("rows_vr_garbage", ds, _patch(data, pos + 4, b"\x01Z"), "VR bytes not a VR")
    ds = _base()
    data = encode(ds)
    pos = _find(data, _COLUMNS_TAG + b"US")
    yield _mutation(
        "columns_vr_ds", ds, _patch(data, pos + 4, b"DS"), "US value re-labelled as DS text"
    )
    ds = _base()
    data = encode(ds)
    pos = _find(data, _ROWS_TAG + b"US")
    # A 3-byte US value (PS3.5 6.2: US is 2 bytes per value), the stream otherwise intact.
    odd = _ROWS_TAG + b"US" + struct.pack("<H", 3) + data[pos + 8 : pos + 10] + b"\x00"
    yield _mutation("rows_length_odd", ds, data[:pos] + odd + data[pos + 10 :],
                    "US value of odd length 3")
    ds = _base()
    data = encode(ds)
    pos = _find(data, _PIXEL_TAG + b"OW")
    (length,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    # Pixel Data re-declared as US (2-byte length field, PS3.5 7.1.2): parses, but lies.
    as_us = _PIXEL_TAG + b"US" + struct.pack("<H", length)
    yield _mutation("pixel_vr_us", ds, data[:pos] + as_us + data[pos + 12 :],
                    "Pixel Data (7FE0,0010) declared with VR US")


def _pixel_attributes() -> Iterator[Mutation]:
    ds = _base()
    del ds.PixelData
    yield _mutation("no_pixel_data", ds, encode(ds), "Pixel Data (7FE0,0010) absent")
    ds = _base()
    ds.Rows, ds.Columns = 65535, 65535
    yield _mutation("absurd_rows_columns", ds, encode(ds), "65535 x 65535 with 64 x 64 pixels")
    ds = _base()
    ds.Rows = 0
    yield _mutation("zero_rows", ds, encode(ds), "Rows = 0")
    ds = _base()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 7, 9, 20
    yield _mutation("inconsistent_bits", ds, encode(ds), "BitsAllocated 7, BitsStored 9, HighBit 20")


def _phi_in_invalid_values() -> Iterator[Mutation]:
    """Valid CXRs whose identifying values break their VR, so a validator would quote them."""
    ds = _base()
    ds.PatientBirthDate = SENTINEL_BIRTH_DATE + "-31"  # DA is YYYYMMDD (PS3.5 Table 6.2-1)
    ds.PatientName = SENTINEL_PATIENT_NAME + "^" * 5 + "x" * 70  # too many components, too long
    ds.PatientID = SENTINEL_PATIENT_ID + "\x07"  # control character in LO
    ds.AccessionNumber = "ACC" + "9" * 20  # SH holds 16 characters
    yield _mutation("phi_invalid_values", ds, encode(ds), "identity values that break their VR")


def _transfer_syntax_lies() -> Iterator[Mutation]:
    for label, claim in (
        ("jpeg_baseline", JPEGBaseline8Bit),
        ("jpegls", JPEGLSLossless),
        ("implicit", ImplicitVRLittleEndian),
        ("big_endian", ExplicitVRBigEndian),
    ):
        ds = _base()
        yield _mutation(
            f"claims_{label}",
            ds,
            encode(ds, meta_ts=claim),
            f"Explicit VR LE bytes sent under a {label} presentation context",
        )


def _other_modalities() -> Iterator[Mutation]:
    for label, sop_class, modality in (
        ("ct", CTImageStorage, "CT"),
        ("mr", MRImageStorage, "MR"),
        ("sc_ot", SecondaryCaptureImageStorage, "OT"),
    ):
        ds = _base()
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.Modality = modality
        ds.BodyPartExamined = "HEAD"
        yield _mutation(f"modality_{label}", ds, encode(ds), f"{modality} object, not a CXR")
    ds = _base()
    ds.BodyPartExamined = "KNEE"
    ds.ViewPosition = "LL"
    yield _mutation("dx_knee_lateral", ds, encode(ds), "DX, but a lateral knee")


def _set_uid(ds: Dataset, keyword: str, value: str) -> None:
    setattr(ds, keyword, value)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = UID(value)


def _bad_uids() -> Iterator[Mutation]:
    cases: list[tuple[str, str, str, str]] = [
        ("sop_letters", "SOPInstanceUID", "1.2.abc.4", "letters in a UID"),
        ("sop_leading_zero", "SOPInstanceUID", "1.2.03.4", "component with a leading zero"),
        ("sop_too_long", "SOPInstanceUID", "1." + "2" * 70, "over 64 characters"),
        ("sop_traversal", "SOPInstanceUID", "../../../../tmp/x", "path traversal"),
        ("sop_dotdot", "SOPInstanceUID", "..", "parent directory"),
        ("study_traversal", "StudyInstanceUID", "1.2/../../../etc", "path separator"),
        ("study_absolute", "StudyInstanceUID", "/tmp/cxr-owned", "absolute path"),
        ("series_backslash", "SeriesInstanceUID", "1.2\\..\\..\\x", "backslash separators"),
        ("study_empty", "StudyInstanceUID", "", "empty Study Instance UID"),
    ]
    for name, keyword, value, why in cases:
        ds = _base()
        _set_uid(ds, keyword, value)
        yield _mutation(f"uid_{name}", ds, encode(ds), why)
    ds = _base()
    del ds.StudyInstanceUID
    yield _mutation("uid_study_missing", ds, encode(ds), "no Study Instance UID at all")


def _sop_mismatch() -> Iterator[Mutation]:
    ds = _base()
    data = encode(ds)
    # pydicom keeps file meta and data set in step when saving, so patch the bytes: the data
    # set's SOP Instance UID gets another last digit (same length), the file meta keeps its own.
    uid = str(ds.SOPInstanceUID).encode("ascii")
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    start = dataset_offset(data)
    yield _mutation(
        "sop_uid_mismatch",
        ds,
        data[:start] + data[start:].replace(uid, other, 1),
        "data set SOP Instance UID differs from the request's (file meta)",
    )
    ds = _base()
    data = encode(ds)
    yield _mutation(
        "empty_dataset",
        ds,
        data[: dataset_offset(data)],
        "file meta only: zero dataset bytes",
    )
    ds = _base()
    data = encode(ds)
    junk = bytes(range(256)) * 16
    yield _mutation("random_bytes", ds, data[: dataset_offset(data)] + junk, "not DICOM at all")


GENERATORS: tuple[Callable[[], Iterator[Mutation]], ...] = (
    _truncations,
    _wrong_lengths,
    _wrong_vrs,
    _pixel_attributes,
    _transfer_syntax_lies,
    _phi_in_invalid_values,
    _other_modalities,
    _bad_uids,
    _sop_mismatch,
)


def corpus() -> list[Mutation]:
    """Every mutation, freshly generated (new UIDs each call), in a stable order of names."""
    with lenient_pydicom():
        items = [m for gen in GENERATORS for m in gen()]
    names = [m.name for m in items]
    if len(set(names)) != len(names):
        raise AssertionError("mutation names must be unique")
    return items


def valid_reference() -> Mutation:
    """The unmutated base, to prove the sending path itself works."""
    ds = _base()
    return _mutation("valid", ds, encode(ds), "valid DX chest radiograph")



# -- sending bytes as they are ---------------------------------------------------------------

# Outcomes that are not a DIMSE status: the peer refused before or instead of answering.
ASSOCIATION_REJECTED = "association-rejected"
CONTEXT_REJECTED = "context-rejected"
NO_RESPONSE = "no-response"


def send_raw(
    host: str,
    port: int,
    files: list[Path],
    *,
    called_aet: str,
    calling_aet: str = "MUTATOR",
    timeout: float = 30.0,
) -> dict[str, int | str]:
    """C-STORE each PS3.10 file's dataset bytes unchanged; return the outcome per file stem.

    Uses pynetdicom's chunked send (the bytes after the file meta go out as they are) and
    relaxes its UID check on the request, so malformed UIDs reach the peer. One association
    carries the whole batch; when the peer aborts, the next file opens a new one, so one bad
    file cannot hide the outcome of the others. An outcome is the C-STORE response status
    (PS3.4 Annex B.2.3), or :data:`ASSOCIATION_REJECTED`, :data:`CONTEXT_REJECTED` or
    :data:`NO_RESPONSE` (the association was aborted or timed out).
    """
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    claims: dict[Path, tuple[str, str]] = {}
    with lenient_pydicom():
        for path in files:
            meta, _ = split_dataset(path)
            claims[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, ts in sorted(set(claims.values())):
        ae.add_requested_context(sop_class, ts)

    saved = _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"]
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    outcomes: dict[str, int | str] = {}
    assoc = None
    lenient = contextlib.ExitStack()
    lenient.enter_context(lenient_pydicom())  # pynetdicom reads the (invalid) file meta
    try:
        for path in files:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate(host, port, ae_title=called_aet)
                if not assoc.is_established:
                    outcomes[path.stem] = ASSOCIATION_REJECTED
                    assoc = None
                    continue
            try:
                status = assoc.send_c_store(path)
            except ValueError:  # pynetdicom: no accepted context for this class/syntax
                outcomes[path.stem] = CONTEXT_REJECTED
                continue
            if "Status" in status:
                outcomes[path.stem] = int(status.Status)
            else:
                # The peer aborted (or timed out): make sure the next file gets a fresh
                # association instead of racing the dying one.
                outcomes[path.stem] = NO_RESPONSE
                assoc.abort()
                assoc = None
        if assoc is not None and assoc.is_established:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"] = saved
        lenient.close()
    return outcomes
