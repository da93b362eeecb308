"""Durable instance storage: the spool, the quarantine and start-up reconciliation.

An instance is kept exactly as the peer encoded it: the data set bytes are written unchanged
behind a freshly built File Meta Information header (PS3.10 Section 7.1), so nothing is decoded
and re-encoded. Before it is kept, every element is read back (:func:`check_data_set`; pixels
are checked for place, not decoded). Layout::

    <spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Directory names come only from UIDs that pass the PS3.5 9.1 syntax check, never from free text;
the two other entries are ``.incoming``, where data sets are written as they arrive
(:mod:`dicom_agent.incoming`), and ``.locks``, whose lock files serialise stores of one SOP
Instance UID across listener processes.
A store is durable before it returns: the temp file is fsynced, renamed over the final name,
the folder fsynced, then the state row is committed. A crash can leave a temp file (removed by
:func:`reconcile`) or a renamed file without its row (rebuilt by :func:`reconcile`), never a
half-written ``.dcm``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

from dicom_agent.conformance import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    is_auditable,
    is_valid_uid,
)
from dicom_agent.errors import (
    DicomInputError,
    InstanceTooLargeError,
    SpoolError,
    SpoolFullError,
)
from dicom_agent.files import (
    atomic_copy,
    atomic_write_text,
    fsync_dir,
    remove_stale_temps,
)
from dicom_agent.incoming import TEMP_SUFFIX, IncomingFile, spool_error
from dicom_agent.state import InstanceState, StateDB, StoreOutcome, StudyState

logger = logging.getLogger(__name__)

FreeSpaceProbe = Callable[[Path], int]

DICOM_SUFFIX = ".dcm"
REASON_SUFFIX = ".reason.txt"
LOCKS_DIR = ".locks"
INCOMING_DIR = ".incoming"
_PREAMBLE = b"\x00" * 128 + b"DICM"
_PIXEL_DATA = 0x7FE00010
_LOCK_STRIPES = 64
_DURABLE_DIRS_MAX = 4096
_DEFER_BYTES = 64 * 1024  # values above this are checked for length and place, not loaded
_INFLATE_CHUNK = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF
# PS3.5 A.1: Pixel Data (7FE0,0010) is OB or OW; a numeric VR there is a lie about the bytes.
_PIXEL_DATA_VRS = frozenset({"OB", "OW"})
# Fixed-size binary VRs (PS3.5 6.2): a value length that is not a multiple cannot be read.
_BINARY_VR_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4,
                    "UV": 8, "SV": 8, "OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
_KNOWN_VRS = frozenset(str(v) for v in VR)

_HEADER_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "AccessionNumber",
    "ViewPosition",
    "BodyPartExamined",
)
_HEADER_TAG_SET = frozenset(int(Tag(k)) for k in _HEADER_KEYWORDS)


def disk_free_bytes(folder: Path) -> int:
    """Free bytes available to us on the file system holding ``folder``."""
    return shutil.disk_usage(folder).free


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that routing and the state row need."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    accession_number: str | None
    view_position: str | None
    body_part: str | None


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    path: Path
    header: InstanceHeader


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _required_uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise DicomInputError(f"{keyword} is missing")
    uid = str(value).strip().rstrip("\x00")
    if not is_valid_uid(uid):
        # Name the attribute, never echo the value: it is the peer's free text.
        raise DicomInputError(f"{keyword} is not a valid UID (PS3.5 9.1)")
    return uid


def _header_of(ds: Dataset) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=_required_uid(ds, "SOPClassUID"),
        sop_instance_uid=_required_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_required_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_required_uid(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        accession_number=_text(ds, "AccessionNumber"),
        view_position=_text(ds, "ViewPosition"),
        body_part=_text(ds, "BodyPartExamined"),
    )


def _inflate(src: BinaryIO, dst: BinaryIO, limit: int) -> None:
    """Inflate a raw deflate stream (PS3.5 A.5, no zlib header) chunk by chunk, at most
    ``limit`` bytes out: about 1 MiB of deflated zeros would otherwise become 1 GiB."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = b""
    try:
        while not inflater.eof:
            if not pending:
                pending = src.read(_INFLATE_CHUNK)
                if not pending:
                    break
            out = inflater.decompress(pending, _INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            total += len(out)
            if total > limit:
                raise InstanceTooLargeError(f"deflated data set inflates past {limit} bytes")
            dst.write(out)
    except zlib.error as exc:
        raise DicomInputError("deflated data set does not inflate") from exc
    if not inflater.eof:
        raise DicomInputError("deflated data set ends before its deflate stream does")


def check_data_set(
    path: Path, offset: int, transfer_syntax_uid: str, *, max_inflated_bytes: int
) -> InstanceHeader:
    """Read every element of the data set stored in ``path`` from ``offset``; return its header.

    This is what a C-STORE Success promises besides durability: the data set is readable.
    Element by element (PS3.5 7.1) every value up to 64 KiB is decoded with its VR, so an
    invalid VR code, a value length that does not fit its VR (an odd-length US) or an element
    that runs past the end is refused here with :class:`DicomInputError`. Larger values are
    checked for VR, length and place without being loaded, and Pixel Data must be OB or OW
    (PS3.5 A.1); pixels are not decoded. A deflated data set (PS3.5 A.5) is inflated into a
    scratch file beside ``path``, at most ``max_inflated_bytes`` (:class:`InstanceTooLargeError`),
    so memory stays at a few chunks whatever the size.
    """
    if transfer_syntax_uid != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return _scan(
            path,
            offset,
            implicit=transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN,
            little=transfer_syntax_uid != EXPLICIT_VR_BIG_ENDIAN,
        )
    # A dot name, so the start-up sweep removes it if a crash leaves it behind.
    inflated = path.parent / f".{path.stem.lstrip('.')}.inflated{TEMP_SUFFIX}"
    try:
        with path.open("rb") as src, inflated.open("wb") as dst:
            src.seek(offset)
            _inflate(src, dst, max_inflated_bytes)
        return _scan(inflated, 0, implicit=False, little=True)
    finally:
        inflated.unlink(missing_ok=True)


def _tag_text(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _scan(path: Path, offset: int, *, implicit: bool, little: bool) -> InstanceHeader:
    header = Dataset()
    encoding: str | list[str] | None = None
    with path.open("rb") as fp:
        end = os.fstat(fp.fileno()).st_size
        fp.seek(offset)
        position = offset
        try:
            for element in data_element_generator(fp, implicit, little, defer_size=_DEFER_BYTES):
                position = fp.tell()
                if position > end:
                    raise DicomInputError(f"element {_tag_text(element.tag)} runs past the end")
                if not isinstance(element, RawDataElement):  # an undefined-length sequence
                    _check_items(element.value, encoding)
                    continue
                converted = _check_element(element, implicit, encoding)
                if converted is None:
                    continue
                if element.tag == 0x00080005:
                    encoding = convert_encodings(converted.value)
                if element.tag in _HEADER_TAG_SET:
                    header.add(converted)
        except DicomInputError:
            raise
        except Exception as exc:  # pydicom raises many types on malformed input
            raise DicomInputError(f"data set does not decode ({type(exc).__name__})") from exc
    if position != end:
        raise DicomInputError("data set ends inside an element (cut short, or a length lies)")
    try:
        return _header_of(header)
    except DicomInputError:
        raise
    except Exception as exc:
        raise DicomInputError(f"data set header does not decode ({type(exc).__name__})") from exc


def _check_element(
    raw: RawDataElement, implicit: bool, encoding: str | list[str] | None
) -> Any | None:
    """Check one top-level element; its converted form, or None when its value was skipped."""
    tag = _tag_text(raw.tag)
    if not implicit and raw.VR not in _KNOWN_VRS:
        raise DicomInputError(f"element {tag} has no valid VR (PS3.5 7.1.2)")
    if raw.tag == _PIXEL_DATA and raw.VR is not None and raw.VR not in _PIXEL_DATA_VRS:
        raise DicomInputError(f"Pixel Data {tag} declared with VR {raw.VR}, not OB or OW")
    size = _BINARY_VR_SIZES.get(raw.VR or "")
    if raw.length != _UNDEFINED_LENGTH and size and raw.length % size:
        raise DicomInputError(f"element {tag}: length {raw.length} does not fit VR {raw.VR}")
    if raw.value is None and raw.length != 0:
        return None  # large value: VR, length and place checked, not loaded
    if raw.length != _UNDEFINED_LENGTH and len(raw.value or b"") != raw.length:
        raise DicomInputError(f"element {tag} is cut short")
    elem = convert_raw_data_element(raw, encoding=encoding)
    if elem.VR == "SQ":
        _check_items(elem.value, encoding)
    return elem


def _check_items(items: Any, encoding: str | list[str] | None) -> None:
    """Decode every element of every item of a sequence (nested sequences included)."""
    for item in items:
        for tag in list(item.keys()):
            elem = item[tag]  # converts from the raw form; raises on what does not decode
            if elem.VR == "SQ":
                _check_items(elem.value, encoding)


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str | None
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information group (PS3.10 7.1) from the C-STORE
    request's UIDs (PS3.7 9.1.1), written before the data set arrives; a data set that
    disagrees with them is refused."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae_title:
        meta.SourceApplicationEntityTitle = source_ae_title
    buf = BytesIO()
    buf.write(_PREAMBLE)
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


def part10_layout(path: Path) -> tuple[str, int]:
    """(transfer syntax, offset of the data set) of a Part 10 file, reading only its File Meta."""
    try:
        meta = read_file_meta_info(path)
        # Preamble and prefix (132 bytes), then the group length element itself (12 bytes,
        # PS3.10 7.1), then the rest of group 0002.
        return str(meta.TransferSyntaxUID), 132 + 12 + int(meta.FileMetaInformationGroupLength)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise DicomInputError(f"file meta does not decode ({type(exc).__name__})") from exc


def file_sha256(path: Path, offset: int) -> str:
    """SHA-256 of the data set stored in ``path`` from ``offset`` (File Meta excluded), in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_INFLATE_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Spool:
    """Durable storage of received instances, plus the quarantine for bytes we cannot use.

    Thread-safe: association threads call :meth:`commit` concurrently. Stores of the same SOP
    Instance UID are serialised so the file on disk and the state row always agree.
    """

    def __init__(
        self,
        root: Path,
        db: StateDB,
        quarantine: Path,
        *,
        min_free_bytes: int = 0,
        free_space: FreeSpaceProbe | None = None,
        max_instance_bytes: int = 1 << 30,
        overwrite: str = "keep_first",
        sync_step_bytes: int = 1 << 20,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.quarantine_root = Path(os.path.abspath(quarantine))
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        self.overwrite = overwrite
        self.sync_step_bytes = sync_step_bytes
        self._free_space = free_space or disk_free_bytes
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._lock_files: dict[int, int] = {}
        # Bytes about to be written by stores in flight: each write reserves its size before
        # it starts, so concurrent stores cannot all pass the floor check on the same free space.
        self._reserved = 0
        self._reserve_lock = threading.Lock()
        # Folders known to exist durably, most recent last. Bounded: a set of every series
        # folder ever made grew by ~0.6 KiB per series for the life of the process.
        self._durable_dirs: OrderedDict[Path, None] = OrderedDict()
        self._dirs_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Release the lock files."""
        for stripe, lock in enumerate(self._locks):
            with lock:
                fd = self._lock_files.pop(stripe, None)
                if fd is not None:
                    os.close(fd)

    @contextmanager
    def _instance_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Serialise stores of one SOP Instance UID across threads *and* listener processes.

        A thread lock per stripe, then an flock on the stripe's file under ``.locks``: flock
        excludes other processes (``scp.workers`` > 1) and other open descriptions of the file
        (housekeeping), not other threads sharing this descriptor.
        """
        stripe = _stripe(sop_instance_uid)
        with self._locks[stripe]:
            fd = self._lock_files.get(stripe)
            if fd is None:
                fd = _open_stripe(self.root, stripe)
                self._lock_files[stripe] = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def path_for(self, header: InstanceHeader) -> Path:
        """Final path of an instance. Every component is a validated UID (PS3.5 9.1)."""
        parts = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        if not all(is_valid_uid(p) for p in parts):
            raise DicomInputError("instance UIDs are not valid for a file name (PS3.5 9.1)")
        return self.root / parts[0] / parts[1] / (parts[2] + DICOM_SUFFIX)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of free space while they are written, or raise :class:`SpoolFullError`.

        The floor check counts what other stores have reserved but not yet written, so 16
        associations writing at once cannot each pass it on the same free space.
        """
        with self._reserve_lock:
            try:
                free = self._free_space(self.root)
            except OSError as exc:
                raise SpoolError(f"cannot read free space of the spool: {exc.strerror}") from exc
            if free - self._reserved - nbytes < self.min_free_bytes:
                raise SpoolFullError("spool free space is below scp.min_free_bytes")
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._reserve_lock:
                self._reserved -= nbytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by writes in flight (a gauge for the metrics)."""
        return self._reserved

    def open_incoming(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        source_ae_title: str | None,
    ) -> IncomingFile:
        """Start writing a data set as it arrives; see :class:`IncomingFile`."""
        meta = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae_title)
        folder = self.root / INCOMING_DIR
        try:
            folder.mkdir(exist_ok=True)
            return IncomingFile(
                folder,
                meta,
                transfer_syntax_uid,
                limit=self.max_instance_bytes,
                reserve=self.reserve,
                sync_step=self.sync_step_bytes,
            )
        except OSError as exc:
            raise spool_error(exc) from exc

    def check(self, incoming: IncomingFile) -> InstanceHeader:
        """Read every element of an arrived data set (:func:`check_data_set`); its header."""
        incoming.complete()
        return check_data_set(
            incoming.path,
            incoming.offset,
            incoming.transfer_syntax_uid,
            max_inflated_bytes=self.max_instance_bytes,
        )

    def commit(self, incoming: IncomingFile, header: InstanceHeader) -> StoreResult:
        """Make an arrived, checked data set durable and record it; returns once both are done.

        Order, each step after the previous one returned: fsync of the file, rename onto
        ``<study>/<series>/<sop>.dcm``, fsync of that folder, state row committed. Auditable
        SOP classes are recorded STORED, any other class IGNORED. Identical bytes already
        stored are a no-op (DUPLICATE). Different bytes under a known SOP Instance UID follow
        ``scp.overwrite``: ``keep_first`` keeps the stored copy (KEPT_FIRST), ``replace``
        stores the new one (REPLACED); the old copy stays linked until the new row is
        committed, and is put back if the commit fails. Raises :class:`SpoolFullError`
        (floor reached or ENOSPC), :class:`SpoolError` (other I/O) or
        :class:`~dicom_agent.errors.StateError`; nothing of the new copy remains then.
        """
        incoming.complete()
        if incoming.error is not None:
            raise incoming.error
        path = self.path_for(header)
        with self._instance_lock(header.sop_instance_uid):
            old = self.db.instance(header.sop_instance_uid)
            old_present = old is not None and Path(old.path).is_file()
            if old is not None and old_present and old.sha256 == incoming.sha256:
                incoming.discard()
                return StoreResult(StoreOutcome.DUPLICATE, Path(old.path), header)
            if old is not None and old_present and self.overwrite == "keep_first":
                incoming.discard()
                return StoreResult(StoreOutcome.KEPT_FIRST, Path(old.path), header)
            backup = self._move_durably(incoming, path, keep_old=old_present)
            try:
                outcome = _record(
                    self.db,
                    header,
                    incoming.transfer_syntax_uid,
                    path,
                    incoming.sha256,
                    incoming.offset + incoming.size,
                    _default_state(header),
                )
            except BaseException:
                # Not acknowledged: put the acknowledged copy back (or remove the new one).
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink(missing_ok=True)
                fsync_dir(path.parent)
                raise
            if backup is not None:
                backup.unlink(missing_ok=True)
            if old is not None and old.path != str(path):
                # The replacement moved to another study/series folder; the row now points
                # at the new file, so the old copy is garbage.
                Path(old.path).unlink(missing_ok=True)
        return StoreResult(outcome, path, header)

    def _move_durably(self, incoming: IncomingFile, path: Path, *, keep_old: bool) -> Path | None:
        """fsync, rename onto ``path``, fsync its folder; a hard link to a copy it replaces
        (until the new row is committed) or None."""
        backup: Path | None = None
        try:
            incoming.sync()
            self._ensure_dir(path.parent)
            if keep_old and path.exists():
                backup = path.parent / f".{path.stem}.{secrets.token_hex(4)}.old{TEMP_SUFFIX}"
                os.link(path, backup)
            os.replace(incoming.path, path)
            fsync_dir(path.parent)
        except OSError as exc:
            incoming.discard()
            if backup is not None:
                os.replace(backup, path)
            raise spool_error(exc) from exc
        return backup

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` (and parents) so that its entry survives a power loss."""
        with self._dirs_lock:
            if folder in self._durable_dirs:
                self._durable_dirs.move_to_end(folder)
                return
        missing: list[Path] = []
        probe = folder
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_dir(created.parent)
        with self._dirs_lock:
            self._durable_dirs[folder] = None
            if len(self._durable_dirs) > _DURABLE_DIRS_MAX:
                self._durable_dirs.popitem(last=False)  # forgotten: probed again if reused

    def quarantine_incoming(self, incoming: IncomingFile, reason: str) -> Path:
        """Keep an arrived data set we refused under ``paths.quarantine``, with a
        ``.reason.txt`` beside it; the spool file goes either way.

        The bytes are copied from the spool file in chunks (the quarantine may be on another
        file system). The name is a timestamp and random token, never anything from the data;
        ``reason`` must not contain PHI (callers pass our own messages, which name attributes,
        not values). Below the free-space floor nothing is kept (:class:`SpoolFullError`):
        refused input must not be the way a peer fills the disk.
        """
        incoming.complete()
        try:
            with self.reserve(incoming.size):
                target = self._quarantine_name()
                atomic_copy(target, incoming.path, incoming.offset)
            self._quarantine_reason(target, reason, incoming.transfer_syntax_uid)
            return target
        finally:
            incoming.discard()

    def _quarantine_name(self) -> Path:
        self.quarantine_root.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(6)}"
        return self.quarantine_root / f"{stem}.bin"

    def _quarantine_reason(self, target: Path, reason: str, transfer_syntax_uid: str | None) -> None:
        note = f"reason: {reason}\n"
        if transfer_syntax_uid:
            note += f"transfer_syntax_uid: {transfer_syntax_uid}\n"
        atomic_write_text(target.with_name(target.stem + REASON_SUFFIX), note)


def _stripe(sop_instance_uid: str) -> int:
    return zlib.crc32(sop_instance_uid.encode("ascii")) % _LOCK_STRIPES


def _open_stripe(root: Path, stripe: int) -> int:
    folder = root / LOCKS_DIR
    folder.mkdir(exist_ok=True)
    return os.open(folder / f"{stripe:02d}", os.O_RDWR | os.O_CREAT, 0o640)


def expire_study(
    db: StateDB,
    spool_root: Path,
    study_uid: str,
    last_instance_before: float,
    states: tuple[StudyState, ...] = (StudyState.AUDITED,),
) -> int:
    """Housekeeping: forget a study's instances and delete their spool files.

    The rows go first, in one transaction that re-checks the study is still in ``states``
    (audited by default; failed or waiting for a draft for their own retention) and quiet
    since ``last_instance_before`` (a late C-STORE re-opens it). Each file is then removed under
    the same stripe lock a store takes, and only if no new row for that SOP Instance UID was
    committed meanwhile: an instance acknowledged after the check is never deleted.
    Returns the number of files removed.
    """
    root = spool_root.resolve()
    removed = 0
    for row in db.take_expired_instances(study_uid, last_instance_before, states):
        path = Path(row.path).resolve()
        if not path.is_relative_to(root):  # never delete outside the spool
            continue
        fd = _open_stripe(root, _stripe(row.sop_instance_uid))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if db.instance(row.sop_instance_uid) is None:
                path.unlink(missing_ok=True)
                removed += 1
        finally:
            os.close(fd)  # closing the descriptor releases the flock
    return removed


def expire_quarantine(quarantine_root: Path, modified_before: float) -> int:
    """Housekeeping: delete quarantined data sets (and their reason files) last written before
    ``modified_before`` (epoch seconds); returns the number of data sets removed."""
    removed = 0
    if not quarantine_root.is_dir():
        return 0
    for kept in quarantine_root.glob("*.bin"):
        try:
            if kept.stat().st_mtime >= modified_before:
                continue
        except FileNotFoundError:
            continue
        kept.with_name(kept.stem + REASON_SUFFIX).unlink(missing_ok=True)
        kept.unlink(missing_ok=True)
        removed += 1
    return removed


def _default_state(header: InstanceHeader) -> InstanceState:
    """Auditable SOP classes are STORED; anything else (``unknown_sop_class=ignore``) IGNORED."""
    return InstanceState.STORED if is_auditable(header.sop_class_uid) else InstanceState.IGNORED


def _record(
    db: StateDB,
    header: InstanceHeader,
    transfer_syntax_uid: str,
    path: Path,
    sha256: str,
    size: int,
    state: InstanceState,
) -> StoreOutcome:
    return db.record_instance(
        sop_instance_uid=header.sop_instance_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        sop_class_uid=header.sop_class_uid,
        modality=header.modality,
        transfer_syntax_uid=transfer_syntax_uid,
        view_position=header.view_position,
        body_part=header.body_part,
        accession_number=header.accession_number,
        path=str(path),
        sha256=sha256,
        size=size,
        state=state,
    )


def reconcile(db: StateDB, spool_root: Path, *, max_inflated_bytes: int = 1 << 30) -> int:
    """Start-up repair of the spool against the state DB; returns the number of rows rebuilt.

    Deletes temp files left by a crash or an aborted transfer (``.incoming/`` included), and
    records every ``.dcm`` file that has no row (crash between rename and commit) or was
    renamed over after its row was last written (crash during a replacement), reading it as a
    C-STORE is read (:func:`check_data_set`, in chunks: a 1 GB file costs no 1 GB of memory).
    Files that cannot be read are logged and left. Call it before the listener starts.
    """
    root = Path(os.path.abspath(spool_root))
    if not root.is_dir():
        return 0
    removed = remove_stale_temps(root)  # TEMP_SUFFIX is its .tmp
    known = db.known_paths()
    rebuilt = 0
    for path in root.rglob(f"*{DICOM_SUFFIX}"):
        key = str(path)
        if key in known:
            row = db.instance(path.stem)
            if row is None or row.path != key or path.stat().st_mtime <= row.updated_at:
                continue
        try:
            transfer_syntax, offset = part10_layout(path)
            header = check_data_set(
                path, offset, transfer_syntax, max_inflated_bytes=max_inflated_bytes
            )
            digest = file_sha256(path, offset)
        except (SpoolError, DicomInputError, OSError) as exc:
            # The file name is a SOP Instance UID: never logged in clear text.
            logger.warning("a spool file is unreadable during reconcile: %s", exc)
            continue
        outcome = _record(
            db, header, transfer_syntax, path, digest, path.stat().st_size, _default_state(header)
        )
        if outcome is not StoreOutcome.DUPLICATE:
            rebuilt += 1
    logger.info("spool reconciled: %d rows rebuilt, %d temp files removed", rebuilt, removed)
    return rebuilt
