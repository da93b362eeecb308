"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

The data goes to a temporary file in the destination folder (same file system, so the rename is
atomic), is fsynced, renamed over the destination, and the folder is fsynced so the rename itself
survives a power loss.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_COPY_CHUNK = 1 << 20


@contextmanager
def _atomic_target(path: Path) -> Iterator[BinaryIO]:
    """A file to fill; on a clean exit it is fsynced and renamed onto ``path`` durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; creates the parent folder."""
    with _atomic_target(path) as fh:
        fh.write(data)
    return path


def atomic_copy(path: Path, source: Path, offset: int = 0) -> Path:
    """Copy ``source`` from byte ``offset`` to ``path`` atomically and durably, in chunks (the
    file may be far larger than memory, and on another file system)."""
    with _atomic_target(path) as fh, source.open("rb") as src:
        src.seek(offset)
        shutil.copyfileobj(src, fh, _COPY_CHUNK)
    return path


def remove_stale_temps(folder: Path) -> int:
    """Delete the temp files :func:`atomic_write_bytes` leaves when the process dies mid-write.

    Their names are ``.<name>.<random>.tmp`` (the spool's own temp files are dot names ending
    ``.tmp`` too, swept by :func:`~dicom_agent.spool.reconcile` with this). Call it at start-up, before anything writes under
    ``folder``; returns the number removed.
    """
    removed = 0
    for path in folder.rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable (fsync of the directory)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
