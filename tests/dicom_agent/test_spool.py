"""Tests for dicom_agent.spool: header parsing, durable store, duplicates, quarantine, reconcile."""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from dicom_agent import spool as spool_mod
from dicom_agent.conformance import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from dicom_agent.errors import DicomInputError, SpoolError, SpoolFullError, StateError
from dicom_agent.spool import LOCKS_DIR, InstanceHeader, Spool, reconcile
from dicom_agent.state import InstanceState, StateDB, StoreOutcome
from tests.support.builders import CT_STORAGE, make_cxr
from tests.support.spooling import check_bytes, data_set_of, sha256, store


def _encoded(ds: Dataset, transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        raw = encode(ds, False, True)
        assert raw is not None
        comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return comp.compress(raw) + comp.flush()
    out = encode(
        ds,
        transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        transfer_syntax != EXPLICIT_VR_BIG_ENDIAN,
    )
    assert out is not None
    return out


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    return StateDB(tmp_path / "state.sqlite3")


@pytest.fixture
def spool(tmp_path: Path, db: StateDB) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", db, tmp_path / "quarantine")
    yield s
    s.close()


def _files(root: Path, pattern: str = "*") -> list[Path]:
    """Instance and temp files under ``root`` (the lock files are not data)."""
    return sorted(
        p for p in root.rglob(pattern) if p.is_file() and LOCKS_DIR not in p.relative_to(root).parts
    )


class TestCheckDataSet:
    @pytest.mark.parametrize(
        "transfer_syntax",
        [
            IMPLICIT_VR_LITTLE_ENDIAN,
            EXPLICIT_VR_LITTLE_ENDIAN,
            EXPLICIT_VR_BIG_ENDIAN,
            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        ],
    )
    def test_reads_routing_attributes_in_every_uncompressed_syntax(
        self, tmp_path: Path, transfer_syntax: str
    ) -> None:
        ds = make_cxr(rows=64, cols=64, modality="CR", view_position="AP", accession="ACC42")
        header = check_bytes(tmp_path, _encoded(ds, transfer_syntax), transfer_syntax)
        assert header == InstanceHeader(
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            modality="CR",
            accession_number="ACC42",
            view_position="AP",
            body_part="CHEST",
        )

    def test_missing_study_uid_is_named(self, tmp_path: Path) -> None:
        ds = make_cxr(rows=16, cols=16)
        del ds.StudyInstanceUID
        with pytest.raises(DicomInputError, match="StudyInstanceUID is missing"):
            check_bytes(tmp_path, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)

    def test_invalid_uid_is_refused_without_echoing_it(self, tmp_path: Path) -> None:
        ds = make_cxr(rows=16, cols=16)
        ds.SeriesInstanceUID = "../../evil"
        with pytest.raises(DicomInputError, match="SeriesInstanceUID is not a valid UID") as info:
            check_bytes(tmp_path, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
        assert "evil" not in str(info.value)

    def test_garbage_does_not_decode(self, tmp_path: Path) -> None:
        garbage = b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 40
        with pytest.raises(DicomInputError):
            check_bytes(tmp_path, garbage, EXPLICIT_VR_LITTLE_ENDIAN)

    def test_garbage_deflate_does_not_inflate(self, tmp_path: Path) -> None:
        with pytest.raises(DicomInputError, match="inflate"):
            check_bytes(tmp_path, b"\xff\xfe not deflate", DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)


class TestStore:
    def test_new_instance_is_a_valid_part10_file_with_the_bytes_as_sent(
        self, spool: Spool, db: StateDB
    ) -> None:
        ds = make_cxr(rows=64, cols=64)
        data = _encoded(ds, IMPLICIT_VR_LITTLE_ENDIAN)
        result = store(spool, ds, data, IMPLICIT_VR_LITTLE_ENDIAN, source_ae_title="MODALITY1")
        assert result.outcome is StoreOutcome.NEW
        expected = (
            spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        )
        assert result.path == expected
        raw = expected.read_bytes()
        assert raw.endswith(data)
        back = dcmread(expected)
        assert back.file_meta.TransferSyntaxUID == IMPLICIT_VR_LITTLE_ENDIAN
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert back.file_meta.SourceApplicationEntityTitle == "MODALITY1"
        assert back.PixelData == ds.PixelData
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None
        assert row.path == str(expected)
        assert row.size == len(raw)
        assert row.state == InstanceState.STORED
        assert row.transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN
        assert _files(spool.root, "*.tmp") == []

    def test_identical_duplicate_is_a_noop(self, spool: Spool) -> None:
        ds = make_cxr(rows=32, cols=32)
        data = _encoded(ds)
        first = store(spool, ds, data, EXPLICIT_VR_LITTLE_ENDIAN)
        mtime = first.path.stat().st_mtime_ns
        second = store(spool, ds, data, EXPLICIT_VR_LITTLE_ENDIAN)
        assert second.outcome is StoreOutcome.DUPLICATE
        assert first.path.stat().st_mtime_ns == mtime
        assert _files(spool.root) == [first.path]

    def test_different_bytes_replace_the_stored_copy(self, spool: Spool, db: StateDB) -> None:
        spool.overwrite = "replace"
        ds = make_cxr(rows=32, cols=32, seed=1)
        store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
        ds2 = make_cxr(
            rows=32,
            cols=32,
            seed=2,
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID,
        )
        data2 = _encoded(ds2)
        result = store(spool, ds2, data2, EXPLICIT_VR_LITTLE_ENDIAN)
        assert result.outcome is StoreOutcome.REPLACED
        assert result.path.read_bytes().endswith(data2)
        assert _files(spool.root) == [result.path]
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None and row.sha256 == sha256(data2)

    def test_different_bytes_keep_the_first_copy_by_default(
        self, spool: Spool, db: StateDB
    ) -> None:
        ds = make_cxr(rows=32, cols=32, seed=1)
        first = _encoded(ds)
        stored = store(spool, ds, first, EXPLICIT_VR_LITTLE_ENDIAN).path
        other_study = make_cxr(rows=32, cols=32, seed=2, sop_uid=ds.SOPInstanceUID)
        result = store(spool, other_study, _encoded(other_study), EXPLICIT_VR_LITTLE_ENDIAN)
        assert result.outcome is StoreOutcome.KEPT_FIRST and result.path == stored
        assert _files(spool.root) == [stored] and stored.read_bytes().endswith(first)
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None and row.sha256 == sha256(first)

    def test_failed_commit_of_a_replacement_puts_the_old_copy_back(
        self, spool: Spool, db: StateDB, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spool.overwrite = "replace"
        ds = make_cxr(rows=32, cols=32, seed=1)
        first = _encoded(ds)
        path = store(spool, ds, first, EXPLICIT_VR_LITTLE_ENDIAN).path
        again = make_cxr(
            rows=32, cols=32, seed=2, study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
        )

        def fail(**kwargs: object) -> None:
            raise StateError("disk I/O error")

        monkeypatch.setattr(db, "record_instance", fail)
        with pytest.raises(StateError):
            store(spool, again, _encoded(again), EXPLICIT_VR_LITTLE_ENDIAN)
        assert _files(spool.root) == [path] and path.read_bytes().endswith(first)
        assert not [p for p in spool.root.rglob("*.tmp")]

    def test_replacement_in_another_series_removes_the_old_file(self, spool: Spool) -> None:
        spool.overwrite = "replace"
        ds = make_cxr(rows=32, cols=32, seed=1)
        old = store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN).path
        moved = make_cxr(rows=32, cols=32, seed=1, sop_uid=ds.SOPInstanceUID)
        new = store(spool, moved, _encoded(moved), EXPLICIT_VR_LITTLE_ENDIAN).path
        assert new != old
        assert _files(spool.root) == [new]

    def test_unknown_sop_class_is_stored_as_ignored(self, spool: Spool, db: StateDB) -> None:
        ds = make_cxr(rows=16, cols=16)
        ds.SOPClassUID = CT_STORAGE
        store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None and row.state == InstanceState.IGNORED

    def test_free_space_floor_refuses_and_writes_nothing(self, tmp_path: Path, db: StateDB) -> None:
        free = {"bytes": 10_000}
        spool = Spool(
            tmp_path / "spool",
            db,
            tmp_path / "q",
            min_free_bytes=1_000_000,
            free_space=lambda _: free["bytes"],
        )
        ds = make_cxr(rows=32, cols=32)
        with pytest.raises(SpoolFullError):
            store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
        assert _files(spool.root) == []
        assert db.instance(ds.SOPInstanceUID) is None
        free["bytes"] = 10**12
        assert store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN).outcome is StoreOutcome.NEW

    def test_enospc_during_write_leaves_no_temp_file(
        self, spool: Spool, db: StateDB, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(spool_mod.os, "fsync", full)
        ds = make_cxr(rows=16, cols=16)
        with pytest.raises(SpoolFullError):
            store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
        assert _files(spool.root) == []
        assert db.instance(ds.SOPInstanceUID) is None

    def test_other_io_errors_are_spool_errors(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(src: object, dst: object) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        ds = make_cxr(rows=16, cols=16)
        monkeypatch.setattr(spool_mod.os, "replace", broken)
        with pytest.raises(SpoolError) as info:
            store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
        assert not isinstance(info.value, SpoolFullError)
        assert _files(spool.root) == []

    def test_concurrent_versions_of_one_instance_leave_file_and_row_agreeing(
        self, spool: Spool, db: StateDB
    ) -> None:
        ds = make_cxr(rows=64, cols=64)
        versions = []
        for seed in range(6):
            v = make_cxr(
                rows=64,
                cols=64,
                seed=seed,
                study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                sop_uid=ds.SOPInstanceUID,
            )
            versions.append((v, _encoded(v)))
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda v: store(spool, v[0], v[1], EXPLICIT_VR_LITTLE_ENDIAN), versions))
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None
        _, on_disk = data_set_of(Path(row.path))
        assert sha256(on_disk) == row.sha256
        assert _files(spool.root) == [Path(row.path)]

    def test_path_components_must_be_uids(self, spool: Spool) -> None:
        header = InstanceHeader("1.2", "1.2.3", "..", "1.2", None, None, None, None)
        with pytest.raises(DicomInputError):
            spool.path_for(header)


class TestQuarantine:
    def test_keeps_bytes_and_reason(self, spool: Spool) -> None:
        incoming = spool.open_incoming("1.2.3", "1.2.3.4", "1.2.840.10008.1.2", None)
        incoming.write(b"junk bytes")
        kept = spool.quarantine_incoming(incoming, "SOPInstanceUID is missing")
        assert kept.read_bytes() == b"junk bytes"  # the data set as sent, not our File Meta
        assert not incoming.path.exists()
        reasons = list(spool.quarantine_root.glob("*.reason.txt"))
        assert len(reasons) == 1
        text = reasons[0].read_text()
        assert "SOPInstanceUID is missing" in text and "1.2.840.10008.1.2" in text
        assert reasons[0].name.startswith(kept.stem)


class TestReconcile:
    def test_rebuilds_missing_rows_and_removes_temp_files(
        self, spool: Spool, tmp_path: Path
    ) -> None:
        ds = make_cxr(rows=32, cols=32)
        data = _encoded(ds)
        stored = store(spool, ds, data, EXPLICIT_VR_LITTLE_ENDIAN).path
        stale = stored.parent / ".leftover.abcd.tmp"
        stale.write_bytes(b"partial")
        # A fresh database: as if the crash came between rename and commit.
        fresh = StateDB(tmp_path / "fresh.sqlite3")
        assert reconcile(fresh, spool.root) == 1
        row = fresh.instance(ds.SOPInstanceUID)
        assert row is not None
        assert row.path == str(stored)
        assert row.sha256 == sha256(data)
        assert row.study_instance_uid == ds.StudyInstanceUID
        assert not stale.exists()
        assert reconcile(fresh, spool.root) == 0

    def test_file_renamed_over_after_its_row_is_re_recorded(
        self, spool: Spool, db: StateDB
    ) -> None:
        ds = make_cxr(rows=32, cols=32, seed=1)
        path = store(spool, ds, _encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN).path
        replacement = make_cxr(
            rows=32,
            cols=32,
            seed=9,
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID,
        )
        new_data = _encoded(replacement)
        meta = spool_mod.file_meta_bytes(
            replacement.SOPClassUID, replacement.SOPInstanceUID, EXPLICIT_VR_LITTLE_ENDIAN, None
        )
        path.write_bytes(meta + new_data)  # crash after the rename, before the commit
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None
        os.utime(path, (row.updated_at + 5, row.updated_at + 5))
        assert reconcile(db, spool.root) == 1
        row = db.instance(ds.SOPInstanceUID)
        assert row is not None and row.sha256 == sha256(new_data)

    def test_unreadable_file_is_left_and_skipped(self, spool: Spool, db: StateDB) -> None:
        bad = spool.root / "1.2" / "1.3" / "1.4.dcm"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"not dicom")
        assert reconcile(db, spool.root) == 0
        assert bad.exists()
