"""One data set being written to the spool while its P-DATA-TF PDUs arrive (PS3.8 Annex E).

The association thread only hands each fragment over. Two threads of the data set do the
rest while later fragments are still on the wire: a writer appends what was handed over to
the temp file and feeds the SHA-256; a flusher ``fdatasync``s the file each time another
``scp.sync_step_bytes`` are in, and the rest once the writer is done, while the C-STORE handler
reads the file back. A flush costs about as much per MiB whenever it runs, so flushing step by
step while the data arrives leaves the fsync before the rename little to do: the peer no
longer waits for the whole image's flush after its last byte (docs/benchmarks.md, "Ingest").
The flusher is a thread of its own because a flush blocks: in the writer it would stall the
writes behind it.

Memory stays bounded: fragments waiting for the writer are at most :data:`QUEUE_BYTES` (plus
the one being handed over); past that the association thread waits, and TCP flow control
slows the peer down.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from dicom_agent.errors import InstanceTooLargeError, SpoolError, SpoolFullError

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
QUEUE_BYTES = 1 << 20
"""Fragments handed over but not yet written, per data set, before the sender waits."""
_IOV_MAX = 512  # fragments per writev (Linux allows 1024)

Reserve = Callable[[int], AbstractContextManager[None]]


def spool_error(exc: OSError) -> SpoolError:
    """The spool error for a failed file operation: full (ENOSPC, EDQUOT) or other I/O."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError("spool file system is full")
    return SpoolError(f"cannot write spool file: {exc.strerror}")


class IncomingFile:
    """The temp file ``<folder>/.<random>.tmp`` of one data set: File Meta first (from the
    C-STORE request), then each fragment as it comes.

    :meth:`write` (the association thread) checks the size against ``limit``
    (:class:`InstanceTooLargeError`: the caller aborts the association) and queues the
    fragment. The writer thread reserves what it takes from the queue against the free-space
    floor (``reserve``), writes it and hashes it; the flusher syncs every ``sync_step`` bytes
    (0: no flusher, only :meth:`sync` does). When space runs out or a write or flush fails,
    the file is unlinked, the rest of the data set is counted but not written, and
    :attr:`error` says why (answered 0xA700).

    :meth:`complete` waits for the writer: :attr:`sha256` and the file's contents are final
    after it, and so is :attr:`error` but for a failure of the last flush, which :meth:`sync`
    raises (it waits for the flusher too, as :meth:`close` and :meth:`discard` do).
    pynetdicom's DIMSE message writes with :meth:`write`, calls ``file.flush()`` and, after
    the C-STORE handler, :meth:`close` and an unlink of :attr:`name` (by then renamed or
    removed).
    """

    def __init__(
        self,
        folder: Path,
        meta: bytes,
        transfer_syntax_uid: str,
        *,
        limit: int,
        reserve: Reserve,
        sync_step: int,
    ) -> None:
        self.transfer_syntax_uid = transfer_syntax_uid
        self.limit = limit
        self.offset = len(meta)
        self.size = 0  # data set bytes received, written or not
        self.error: SpoolError | None = None
        self._reserve = reserve
        self._sync_step = sync_step
        self._hash = hashlib.sha256()
        self.path = folder / f".{secrets.token_hex(8)}{TEMP_SUFFIX}"
        # Only the writer and flusher threads use the descriptor while they run; the owner
        # closes it after :meth:`complete`.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._cond = threading.Condition()
        self._pending: deque[bytes | memoryview] = deque()
        self._queued = 0  # bytes handed over, not yet written
        self._ending = False  # no more fragments: the threads finish and exit
        self._dropping = False  # discarded: what is queued is not written
        self._written = len(meta)
        self._flush_at = len(meta) + sync_step
        self._flush_wanted = False
        self._writer: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self._write_batch([meta], hashed=False)

    @property
    def name(self) -> str:
        """The temp file's path (pynetdicom unlinks it after the handler, as its own)."""
        return str(self.path)

    @property
    def file(self) -> IncomingFile:
        """Itself: pynetdicom calls ``file.flush()`` as on a NamedTemporaryFile."""
        return self

    @property
    def sha256(self) -> str:
        """SHA-256 of the data set bytes as sent (the File Meta is not part of it); final
        after :meth:`complete`."""
        return self._hash.hexdigest()

    def flush(self) -> None:
        """Nothing to flush: the writer hands each fragment to the kernel as it comes."""

    def write(self, data: bytes | memoryview) -> int:
        """Queue one data set fragment (called for each PDV, by pynetdicom or the transport).

        ``data`` is written later by the writer thread, so the caller must not reuse its
        buffer: the transport reads every PDU into a buffer of its own.
        """
        if self._ending:
            raise RuntimeError("write() after complete(): the data set has ended")
        self.size += len(data)
        if self.size > self.limit:
            self.discard()
            raise InstanceTooLargeError(f"data set exceeds scp.max_instance_bytes={self.limit}")
        if self.error is None and len(data):
            self._hand_over(data)
        return len(data)

    def _hand_over(self, data: bytes | memoryview) -> None:
        with self._cond:
            # One piece larger than the bound still goes through once the queue is empty.
            while self._queued and self._queued + len(data) > QUEUE_BYTES:
                self._cond.wait()
            self._pending.append(data)
            self._queued += len(data)
            if self._writer is None:
                self._writer = _started(self._write_loop, "spool-writer")
                if self._sync_step:
                    self._flusher = _started(self._flush_loop, "spool-flusher")
            self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._ending:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = [self._pending.popleft() for _ in range(min(_IOV_MAX, len(self._pending)))]
            nbytes = sum(len(b) for b in batch)
            if self.error is None and not self._dropping:
                self._write_batch(batch, hashed=True)
            with self._cond:
                self._queued -= nbytes
                if self._sync_step and self._written >= self._flush_at:
                    self._flush_wanted = True
                    self._flush_at = self._written + self._sync_step
                self._cond.notify_all()

    def _write_batch(self, batch: list[bytes | memoryview], *, hashed: bool) -> None:
        """Reserve, write (one ``writev`` as a rule) and hash ``batch``; on failure unlink the
        file and set :attr:`error`."""
        nbytes = sum(len(b) for b in batch)
        views = [memoryview(b) for b in batch]
        try:
            with self._reserve(nbytes):
                assert self._fd is not None
                rest = list(views)
                while rest:
                    done = os.writev(self._fd, rest)
                    while rest and done >= len(rest[0]):
                        done -= len(rest.pop(0))
                    if rest and done:
                        rest[0] = rest[0][done:]
            self._written += nbytes
            if hashed:
                for view in views:
                    self._hash.update(view)
        except SpoolError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(spool_error(exc))
        except Exception:  # a thread's boundary: a dead writer would stall the association
            logger.exception("spool writer failed unexpectedly")
            self._fail(SpoolError("cannot write spool file: internal error"))

    def _flush_loop(self) -> None:
        """Flush each step; once the writer is done, flush the rest (while the owner reads
        the file back for :meth:`Spool.check`) and exit."""
        while True:
            with self._cond:
                while not self._flush_wanted and not self._ending:
                    self._cond.wait()
                self._flush_wanted = False
                last = self._ending
            if last and self._writer is not None:
                self._writer.join()
            if self.error is None and not self._dropping:
                try:
                    assert self._fd is not None
                    os.fdatasync(self._fd)
                except OSError as exc:
                    self._fail(spool_error(exc))
            if last:
                return

    def _fail(self, exc: SpoolError) -> None:
        # The descriptor stays open (the other thread may be using it) until the owner
        # closes it; unlinking now gives the space back as soon as it is closed.
        if self.error is None:
            self.error = exc
        self.path.unlink(missing_ok=True)

    def complete(self) -> None:
        """Wait until every queued fragment is written (idempotent). The flusher may still be
        flushing the last of it: :meth:`sync` waits for that too."""
        with self._cond:
            self._ending = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join()

    def _stop(self) -> None:
        self.complete()
        if self._flusher is not None:
            self._flusher.join()
        self._writer = self._flusher = None

    def sync(self) -> None:
        """Write what is queued, fsync the whole file and close it: called before the rename."""
        self._stop()
        if self.error is not None:
            raise self.error
        assert self._fd is not None
        os.fsync(self._fd)
        self._close_fd()

    def close(self) -> None:
        """Finish writing and close the descriptor (idempotent); the file stays until
        committed or discarded."""
        self._stop()
        self._close_fd()

    def discard(self) -> None:
        """Stop writing, close and delete the file (idempotent)."""
        self._dropping = True
        self.close()
        self.path.unlink(missing_ok=True)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _started(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
