"""Durable instance storage: the spool, the quarantine and start-up reconciliation.

An instance is kept exactly as the peer encoded it: the data set bytes are written unchanged
behind a freshly built File Meta Information header (PS3.10 Section 7.1), so nothing is decoded
and re-encoded. Only the header attributes the state row needs are parsed, stopping before the
pixels. Layout::

    <spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Directory names come only from UIDs that pass the PS3.5 9.1 syntax check, never from free text;
the one other entry, ``.locks``, holds the lock files that serialise stores of one SOP Instance
UID across listener processes.
A store is durable before it returns: temp file in the destination folder, write, fsync, rename
over the final name, fsync of the folder, then the state row is committed. A crash can leave a
temp file (removed by :func:`reconcile`) or a renamed file without its row (rebuilt by
:func:`reconcile`), never a half-written ``.dcm``.
"""

from __future__ import annotations

import errno
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicom_agent.conformance import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    is_auditable,
    is_valid_uid,
)
from dicom_agent.errors import DicomInputError, SpoolError, SpoolFullError
from dicom_agent.files import atomic_write_bytes, atomic_write_text, fsync_dir
from dicom_agent.state import InstanceState, StateDB, StoreOutcome

logger = logging.getLogger(__name__)

FreeSpaceProbe = Callable[[Path], int]

DICOM_SUFFIX = ".dcm"
TEMP_SUFFIX = ".tmp"
REASON_SUFFIX = ".reason.txt"
LOCKS_DIR = ".locks"
_PREAMBLE = b"\x00" * 128 + b"DICM"
_PIXEL_DATA = 0x7FE00010
_LOCK_STRIPES = 64
_DURABLE_DIRS_MAX = 4096
_HASH_THREADS = 4

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
_HEADER_TAGS: list[BaseTag | int] = [Tag(k) for k in _HEADER_KEYWORDS]


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


def read_header(data_set: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse the routing and state attributes from an encoded data set (no File Meta).

    Stops before Pixel Data and reads only the attributes we need. Raises
    :class:`DicomInputError` when the data set cannot be decoded or lacks a valid SOP Class,
    SOP Instance, Study Instance or Series Instance UID.
    """
    if transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        try:
            # PS3.5 A.5: the whole data set is one raw deflate stream (no zlib header).
            data_set = zlib.decompress(data_set, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise DicomInputError("deflated data set does not inflate") from exc
    try:
        ds = read_dataset(
            BytesIO(data_set),
            is_implicit_VR=transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN,
            is_little_endian=transfer_syntax_uid != EXPLICIT_VR_BIG_ENDIAN,
            stop_when=lambda tag, vr, length: tag == _PIXEL_DATA,
            specific_tags=_HEADER_TAGS,
        )
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
    except DicomInputError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise DicomInputError(f"data set header does not decode ({type(exc).__name__})") from exc


def encode_file_meta(
    header: InstanceHeader, transfer_syntax_uid: str, source_ae_title: str | None
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information group (PS3.10 7.1) for an instance."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(header.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(header.sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae_title:
        meta.SourceApplicationEntityTitle = source_ae_title
    buf = BytesIO()
    buf.write(_PREAMBLE)
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


def read_part10(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a Part 10 file, without decoding the data set."""
    try:
        meta = read_file_meta_info(path)
        # Preamble and prefix (132 bytes), then the group length element itself (12 bytes,
        # PS3.10 7.1), then the rest of group 0002.
        offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        transfer_syntax = str(meta.TransferSyntaxUID)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        raise DicomInputError(f"file meta does not decode ({type(exc).__name__})") from exc
    with path.open("rb") as fh:
        fh.seek(offset)
        return transfer_syntax, fh.read()


def dataset_sha256(data_set: bytes) -> str:
    """SHA-256 of the data set bytes as sent (the File Meta we add is not part of it)."""
    return hashlib.sha256(data_set).hexdigest()


class Spool:
    """Durable storage of received instances, plus the quarantine for bytes we cannot use.

    Thread-safe: association threads call :meth:`store` concurrently. Stores of the same SOP
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
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.quarantine_root = Path(os.path.abspath(quarantine))
        self.db = db
        self.min_free_bytes = min_free_bytes
        self._free_space = free_space or disk_free_bytes
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._lock_files: dict[int, int] = {}
        self._hasher = ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="spool-sha")
        # Folders known to exist durably, most recent last. Bounded: a set of every series
        # folder ever made grew by ~0.6 KiB per series for the life of the process.
        self._durable_dirs: OrderedDict[Path, None] = OrderedDict()
        self._dirs_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Release the hashing threads and lock files (stores in flight finish first)."""
        self._hasher.shutdown(wait=True)
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

    def check_free_space(self, incoming_bytes: int) -> None:
        """Raise :class:`SpoolFullError` when storing ``incoming_bytes`` would cross the floor."""
        try:
            free = self._free_space(self.root)
        except OSError as exc:
            raise SpoolError(f"cannot read free space of the spool: {exc.strerror}") from exc
        if free - incoming_bytes < self.min_free_bytes:
            raise SpoolFullError("spool free space is below scp.min_free_bytes")

    def store(
        self,
        data_set: bytes,
        transfer_syntax_uid: str,
        *,
        header: InstanceHeader | None = None,
        source_ae_title: str | None = None,
    ) -> StoreResult:
        """Store one instance durably and record it; returns once both are committed.

        Auditable SOP classes are recorded STORED, any other class IGNORED. Identical bytes already stored are a no-op (DUPLICATE); different bytes for a known SOP
        Instance UID replace the stored copy atomically (REPLACED). Raises
        :class:`DicomInputError` (malformed), :class:`SpoolFullError` (floor reached or ENOSPC),
        :class:`SpoolError` (other I/O) or :class:`~dicom_agent.errors.StateError`.
        """
        header = header or read_header(data_set, transfer_syntax_uid)
        path = self.path_for(header)
        # Hash on a helper thread (hashlib releases the GIL) while this one writes and fsyncs:
        # for a new instance the two overlap; only a known SOP Instance UID waits for it first.
        digest_future = self._hasher.submit(dataset_sha256, data_set)
        with self._instance_lock(header.sop_instance_uid):
            old = self.db.instance(header.sop_instance_uid)
            if (
                old is not None
                and old.sha256 == digest_future.result()
                and Path(old.path).is_file()
            ):
                return StoreResult(StoreOutcome.DUPLICATE, Path(old.path), header)
            meta = encode_file_meta(header, transfer_syntax_uid, source_ae_title)
            self.check_free_space(len(meta) + len(data_set))
            self._write_durably(path, meta, data_set)
            outcome = _record(
                self.db,
                header,
                transfer_syntax_uid,
                path,
                digest_future.result(),
                len(meta) + len(data_set),
                _default_state(header),
            )
            if old is not None and old.path != str(path):
                # The replacement moved to another study/series folder; the row now points
                # at the new file, so the old copy is garbage.
                Path(old.path).unlink(missing_ok=True)
        return StoreResult(outcome, path, header)

    def _write_durably(self, path: Path, meta: bytes, data_set: bytes) -> None:
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            self._ensure_dir(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "wb") as fh:
                fh.write(meta)
                fh.write(data_set)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as exc:
            # Whatever failed, no temp file is left behind.
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFullError("spool file system is full") from exc
                raise SpoolError(f"cannot write spool file: {exc.strerror}") from exc
            raise

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

    def quarantine(self, data: bytes, reason: str, transfer_syntax_uid: str | None = None) -> Path:
        """Keep bytes we refused under ``paths.quarantine`` with a ``.reason.txt`` beside them.

        The name is a timestamp and random token, never anything from the data. ``reason`` must
        not contain PHI (callers pass our own messages, which name attributes, not values).
        """
        # Below the free-space floor nothing is kept: refused input must not be the way a
        # peer fills the disk (raises SpoolFullError).
        self.check_free_space(len(data))
        self.quarantine_root.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(6)}"
        note = f"reason: {reason}\n"
        if transfer_syntax_uid:
            note += f"transfer_syntax_uid: {transfer_syntax_uid}\n"
        target = atomic_write_bytes(self.quarantine_root / f"{stem}.bin", data)
        atomic_write_text(self.quarantine_root / f"{stem}{REASON_SUFFIX}", note)
        return target


def _stripe(sop_instance_uid: str) -> int:
    return zlib.crc32(sop_instance_uid.encode("ascii")) % _LOCK_STRIPES


def _open_stripe(root: Path, stripe: int) -> int:
    folder = root / LOCKS_DIR
    folder.mkdir(exist_ok=True)
    return os.open(folder / f"{stripe:02d}", os.O_RDWR | os.O_CREAT, 0o640)


def expire_study(db: StateDB, spool_root: Path, study_uid: str, last_instance_before: float) -> int:
    """Housekeeping: forget an audited study's instances and delete their spool files.

    The rows go first, in one transaction that re-checks the study is still audited and quiet
    since ``last_instance_before`` (a late C-STORE re-opens it). Each file is then removed under
    the same stripe lock a store takes, and only if no new row for that SOP Instance UID was
    committed meanwhile: an instance acknowledged after the check is never deleted.
    Returns the number of files removed.
    """
    root = spool_root.resolve()
    removed = 0
    for row in db.take_expired_instances(study_uid, last_instance_before):
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


def reconcile(db: StateDB, spool_root: Path) -> int:
    """Start-up repair of the spool against the state DB; returns the number of rows rebuilt.

    Deletes temp files left by a crash or an aborted transfer, and records every ``.dcm`` file
    that has no row (crash between rename and commit) or was renamed over after its row was
    last written (crash during a replacement). Files that cannot be read are logged and left.
    Call it before the listener starts.
    """
    root = Path(os.path.abspath(spool_root))
    if not root.is_dir():
        return 0
    removed = 0
    for tmp in root.rglob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed += 1
    known = db.known_paths()
    rebuilt = 0
    for path in root.rglob(f"*{DICOM_SUFFIX}"):
        key = str(path)
        if key in known:
            row = db.instance(path.stem)
            if row is None or row.path != key or path.stat().st_mtime <= row.updated_at:
                continue
        try:
            transfer_syntax, data_set = read_part10(path)
            header = read_header(data_set, transfer_syntax)
        except (DicomInputError, OSError) as exc:
            logger.warning("spool file %s unreadable during reconcile: %s", path.name, exc)
            continue
        outcome = _record(
            db,
            header,
            transfer_syntax,
            path,
            dataset_sha256(data_set),
            path.stat().st_size,
            _default_state(header),
        )
        if outcome is not StoreOutcome.DUPLICATE:
            rebuilt += 1
    logger.info("spool reconciled: %d rows rebuilt, %d temp files removed", rebuilt, removed)
    return rebuilt
