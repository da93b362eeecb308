"""Tests for dicom_agent.incoming: a data set written, hashed and flushed while it arrives."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dicom_agent import incoming as incoming_mod
from dicom_agent.errors import InstanceTooLargeError, SpoolError, SpoolFullError
from dicom_agent.incoming import QUEUE_BYTES, IncomingFile

MIB = 1 << 20
META = b"M" * 132


@contextmanager
def _no_floor(nbytes: int) -> Iterator[None]:
    yield


def _open(
    folder: Path,
    *,
    sync_step: int = MIB,
    limit: int = 1 << 30,
    reserve: Callable[[int], object] = _no_floor,
) -> IncomingFile:
    return IncomingFile(
        folder, META, "1.2.840.10008.1.2.1", limit=limit, reserve=reserve,  # type: ignore[arg-type]
        sync_step=sync_step,
    )


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def _spool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spool-")]


def _before_each_write(monkeypatch: pytest.MonkeyPatch, before: Callable[[], object]) -> None:
    """Run ``before`` ahead of every ``writev`` of the writer thread (a slow disk)."""
    real = os.writev

    def slow_writev(fd: int, buffers: list[memoryview]) -> int:
        before()
        return real(fd, buffers)

    monkeypatch.setattr(incoming_mod.os, "writev", slow_writev)


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the file size at every ``fdatasync`` (the flusher's calls)."""
    sizes: list[int] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        sizes.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(incoming_mod.os, "fdatasync", recording)
    return sizes


def test_file_holds_meta_then_fragments_and_hash_covers_the_data_set(tmp_path: Path) -> None:
    fragments = [os.urandom(n) for n in (1, 4096, 3 * MIB + 7, 128 * 1024)]
    f = _open(tmp_path)
    for fragment in fragments:
        f.write(memoryview(fragment))
    f.sync()
    data = b"".join(fragments)
    assert f.path.read_bytes() == META + data
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert (f.size, f.offset, f.error) == (len(data), len(META), None)
    assert _spool_threads() == []


def test_flushes_while_the_data_set_is_still_arriving(tmp_path: Path, flushes: list[int]) -> None:
    f = _open(tmp_path, sync_step=MIB)
    f.write(os.urandom(MIB + 1))
    # Nothing more arrives until the flusher has synced the first step on its own.
    assert _wait_for(lambda: bool(flushes)), "no fdatasync while the data set was incomplete"
    assert flushes[0] >= len(META) + MIB
    f.write(os.urandom(MIB))
    f.sync()
    assert f.path.stat().st_size == len(META) + 2 * MIB + 1


def test_sync_step_zero_leaves_the_flush_to_the_final_fsync(
    tmp_path: Path, flushes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs: list[int] = []
    monkeypatch.setattr(incoming_mod.os, "fsync", lambda fd: fsyncs.append(fd))
    f = _open(tmp_path, sync_step=0)
    for _ in range(4):
        f.write(os.urandom(MIB))
    f.sync()
    assert flushes == []
    assert len(fsyncs) == 1


def test_queued_bytes_are_bounded_while_the_disk_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    f = _open(tmp_path)  # the File Meta is written before the patch, by the constructor
    _before_each_write(monkeypatch, lambda: release.wait(10))
    handed: list[int] = []

    piece = QUEUE_BYTES // 4

    def sender() -> None:
        for _ in range(64):
            f.write(b"x" * piece)
            handed.append(piece)

    thread = threading.Thread(target=sender)
    thread.start()
    # Bytes count as queued until written: the sender stops at the bound.
    assert _wait_for(lambda: sum(handed) >= QUEUE_BYTES)
    time.sleep(0.2)
    assert sum(handed) <= QUEUE_BYTES
    assert thread.is_alive()
    release.set()
    thread.join(10)
    f.sync()
    assert f.path.stat().st_size == len(META) + 64 * piece


def test_disk_full_while_writing_drops_the_file_and_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = _open(tmp_path)

    def full(fd: int, buffers: list[memoryview]) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(incoming_mod.os, "writev", full)
    f.write(b"a" * 1000)
    f.write(b"b" * 1000)
    f.complete()
    assert isinstance(f.error, SpoolFullError)
    assert not f.path.exists()
    assert f.size == 2000
    with pytest.raises(SpoolFullError):
        f.sync()
    f.discard()
    assert _spool_threads() == []


def test_floor_reached_mid_transfer_is_an_error_not_a_crash(tmp_path: Path) -> None:
    budget = {"bytes": len(META) + MIB}

    @contextmanager
    def reserve(nbytes: int) -> Iterator[None]:
        if nbytes > budget["bytes"]:
            raise SpoolFullError("spool free space is below scp.min_free_bytes")
        budget["bytes"] -= nbytes
        yield

    f = _open(tmp_path, reserve=reserve)
    f.write(b"a" * MIB)
    assert _wait_for(lambda: budget["bytes"] == 0)  # the first MiB fitted
    f.write(b"b" * MIB)
    f.complete()
    assert isinstance(f.error, SpoolFullError)
    assert not f.path.exists()
    f.discard()


def test_failed_flush_fails_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(incoming_mod.os, "fdatasync", broken)
    f = _open(tmp_path, sync_step=MIB)
    f.write(b"a" * (2 * MIB))
    with pytest.raises(SpoolError) as info:
        f.sync()
    assert not isinstance(info.value, SpoolFullError)
    assert not f.path.exists()
    f.discard()


def test_past_the_limit_the_file_goes_and_the_caller_is_told(tmp_path: Path) -> None:
    f = _open(tmp_path, limit=MIB)
    f.write(b"a" * MIB)
    with pytest.raises(InstanceTooLargeError):
        f.write(b"b")
    assert not f.path.exists()
    assert _spool_threads() == []


def test_discard_while_the_writer_is_busy_stops_both_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    f = _open(tmp_path)
    _before_each_write(monkeypatch, lambda: (started.set(), time.sleep(0.05)))
    for _ in range(8):
        f.write(b"a" * (MIB // 2))
    assert started.wait(10)
    f.discard()
    assert not f.path.exists()
    assert _spool_threads() == []
    f.discard()  # idempotent


def test_close_keeps_the_file_for_its_owner(tmp_path: Path) -> None:
    f = _open(tmp_path)
    f.write(b"a" * 10)
    f.close()
    f.close()
    assert f.path.read_bytes() == META + b"a" * 10
    with pytest.raises(RuntimeError, match="after complete"):
        f.write(b"late")
