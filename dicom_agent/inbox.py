"""The drafts inbox: draft report files dropped into the drafts folder, read safely.

A draft is ``<AccessionNumber>.txt`` or ``<StudyInstanceUID>.txt`` (UTF-8 text), or a JSON
file ``{"accession_number"?, "study_instance_uid"?, "text", "author"?}``. The folder is polled
(an apscheduler interval job runs :meth:`DraftReader.poll`); a file is read only once its size
and modification time have not changed for ``drafts.stable_seconds`` over two polls, so a file
still being written is never read. Hidden files and ``*.tmp`` / ``*.part`` are left alone.

Outcomes, each a move that never overwrites another file:

- accepted: recorded in the state DB (text and SHA-256) and moved to ``processed/``;
- identical to the study's current draft: recorded as a no-op, moved to ``processed/``;
- bad (empty, too large, not UTF-8, a name that is no valid key, JSON that does not validate):
  moved to ``rejected/`` with ``<name>.reason.txt`` beside it;
- changed while being read: left in place and read again on a later poll.

Key syntax follows PS3.5: a Study Instance UID is a UI value (section 9.1: digits and dots, no
leading zeros, at most 64 characters); an Accession Number is an SH value (at most 16
characters; for file names we also restrict it to letters, digits, ``.``, ``_`` and ``-``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from dicom_agent.config import AgentSettings
from dicom_agent.conformance import is_valid_uid
from dicom_agent.files import atomic_write_text
from dicom_agent.observe import Event, Metrics, event, study_ref
from dicom_agent.state import DraftOutcome, StateDB

log = logging.getLogger(__name__)

PROCESSED_DIR = "processed"
REJECTED_DIR = "rejected"
REASON_SUFFIX = ".reason.txt"
IGNORED_SUFFIXES = (".tmp", ".part")

_ACCESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")
_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]")


class KeyKind:
    STUDY_UID = "study_uid"
    ACCESSION = "accession"


class Reject:
    """Reason codes for rejected drafts (written to the reason file and the log)."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    BAD_NAME = "bad_name"
    BAD_JSON = "bad_json"
    UNSUPPORTED_TYPE = "unsupported_type"


def is_study_uid(value: str) -> bool:
    """True for a valid UID (PS3.5 9.1) of at least two components: a single number is read
    as an accession number, which may well be all digits."""
    return "." in value and is_valid_uid(value)


def is_accession(value: str) -> bool:
    """True for an accession number usable as a file name (an SH value, PS3.5 6.2)."""
    return bool(_ACCESSION_RE.match(value)) and not is_study_uid(value)


def key_of_name(stem: str) -> tuple[str, str] | None:
    """``(key, kind)`` for a draft file stem, or None when the stem is no valid key."""
    if is_study_uid(stem):
        return stem, KeyKind.STUDY_UID
    if is_accession(stem):
        return stem, KeyKind.ACCESSION
    return None


class DraftFile(BaseModel):
    """The JSON draft format. Messages never echo the offending value (it may be PHI)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    accession_number: str | None = None
    study_instance_uid: str | None = None
    text: str
    author: str | None = None

    @field_validator("study_instance_uid")
    @classmethod
    def _uid(cls, value: str | None) -> str | None:
        if value is not None and not is_study_uid(value.strip()):
            raise ValueError("must be a DICOM UID (digits and dots, at most 64 characters)")
        return value.strip() if value is not None else None

    @field_validator("accession_number")
    @classmethod
    def _accession(cls, value: str | None) -> str | None:
        if value is not None and not _ACCESSION_RE.match(value.strip()):
            raise ValueError("must be 1-16 letters, digits, '.', '_' or '-'")
        return value.strip() if value is not None else None

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _has_key(self) -> DraftFile:
        if not self.study_instance_uid and not self.accession_number:
            raise ValueError("needs accession_number or study_instance_uid")
        return self

    def key(self) -> tuple[str, str]:
        if self.study_instance_uid:
            return self.study_instance_uid, KeyKind.STUDY_UID
        assert self.accession_number is not None  # guaranteed by _has_key
        return self.accession_number, KeyKind.ACCESSION


@dataclass(frozen=True)
class Observation:
    """What one poll saw of a file: size, mtime and since when they have not changed."""

    size: int
    mtime_ns: int
    since: float


def observe(prev: Observation | None, size: int, mtime_ns: int, now: float) -> Observation:
    """The new observation of a file given the previous one (pure)."""
    if prev is not None and (prev.size, prev.mtime_ns) == (size, mtime_ns):
        return prev
    return Observation(size=size, mtime_ns=mtime_ns, since=now)


def is_stable(prev: Observation | None, cur: Observation, now: float, stable_seconds: float) -> bool:
    """A file is stable when a previous poll saw the same size and mtime, long enough ago."""
    return prev is not None and prev == cur and now - cur.since >= stable_seconds


@dataclass
class PollReport:
    accepted: list[int] = field(default_factory=list)  # draft ids
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)  # reason codes
    retried: int = 0


class _Rejected(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


class DraftReader:
    """Reads the drafts folder; one instance per agent (it remembers what it has seen).

    A subclass reads another folder of report texts the same way (the finals folder,
    :mod:`dicom_agent.finals`) by overriding :meth:`_store`, :meth:`_store_file_name`, the
    noun of its log lines and its events.
    """

    #: What the folder holds, in log lines.
    noun = "draft"
    accepted_event = Event.DRAFT_ACCEPTED
    duplicate_event = Event.DRAFT_DUPLICATE
    rejected_event = Event.DRAFT_REJECTED
    retry_event = Event.DRAFT_RETRY

    def __init__(self, settings: AgentSettings, db: StateDB, metrics: Metrics | None = None):
        self.folder = settings.paths.drafts
        self.max_bytes = settings.drafts.max_bytes
        self.stable_seconds = settings.drafts.stable_seconds
        self.db = db
        self.metrics = metrics
        self._seen: dict[str, Observation] = {}

    def poll(self, now: float | None = None) -> PollReport:
        """Handle every stable draft in the folder once. Never raises for a bad file."""
        now = time.time() if now is None else now
        report = PollReport()
        present: set[str] = set()
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return report
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                continue
            # Symlinks are not followed: a link could point anywhere outside the folder.
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            present.add(name)
            prev = self._seen.get(name)
            cur = observe(prev, st.st_size, st.st_mtime_ns, now)
            self._seen[name] = cur
            if not is_stable(prev, cur, now, self.stable_seconds):
                continue
            try:
                self._handle(Path(entry.path), cur, now, report)
            except OSError as exc:  # a move that failed: retried next poll, other drafts go on
                self._seen.pop(name, None)
                log.warning("%s could not be filed (%s); retrying", self.noun, _os_reason(exc))
            except Exception as exc:  # one bad file must never block the drafts behind it
                self._seen.pop(name, None)
                log.error("%s could not be handled (%s); retrying", self.noun, type(exc).__name__)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return report

    # -- one file -------------------------------------------------------------------------------

    def _handle(self, path: Path, seen: Observation, now: float, report: PollReport) -> None:
        try:
            data = self._read_stable(path, seen)
        except _Changed:
            self._seen.pop(path.name, None)
            report.retried += 1
            log.info("%s changed while read; retrying", self.noun,
                     extra=event(event=self.retry_event))
            self._count("retried")
            return
        except OSError as exc:  # the message would name the file, i.e. the accession number
            log.warning("%s file could not be read (%s); retrying", self.noun, _os_reason(exc))
            return
        sha = hashlib.sha256(data).hexdigest()
        try:
            key, kind, text, author = self._parse(path, data)
        except _Rejected as rej:
            self._reject(path, sha, rej)
            report.rejected.append(rej.code)
            return
        outcome, draft_id = self._store(key, kind, _text_name(path.name), sha, text, author, now)
        dest = _move_unique(path, self.folder / PROCESSED_DIR, sha)
        self._seen.pop(path.name, None)
        if outcome is DraftOutcome.DUPLICATE:
            report.duplicates += 1
            self._count("duplicate")
            log.info(
                "%s identical to the current one; no re-audit", self.noun,
                extra=event(event=self.duplicate_event, draft_id=draft_id, study=self._study_ref(key)),
            )
            return
        if dest.name != path.name:
            # keep the row pointing at the file as it is named in processed/
            self._store_file_name(draft_id, _text_name(dest.name))
        report.accepted.append(draft_id)
        self._count("accepted")
        log.info(
            "%s accepted", self.noun,
            extra=event(event=self.accepted_event, draft_id=draft_id, study=self._study_ref(key)),
        )

    def _store(
        self, key: str, kind: str, file_name: str, sha: str, text: str, author: str | None,
        now: float,
    ) -> tuple[DraftOutcome, int]:
        """Record one accepted file; ``(outcome, row id)``."""
        return self.db.record_draft(
            key=key, key_kind=kind, file_name=file_name, sha256=sha, text=text, author=author,
            now=now,
        )

    def _store_file_name(self, row_id: int, file_name: str) -> None:
        self.db.set_draft_file_name(row_id, file_name)

    def _study_ref(self, key: str) -> str | None:
        """The log reference of the one study ``key`` names, as every other line writes it.

        Never the hash of the key itself: an accession number and the Study Instance UID of
        the same study would hash differently, and one study would carry two references.
        None (no ``study`` field) while no study or several hold the key; the later
        ``draft.paired`` line links the ``draft_id`` to its study.
        """
        studies = self.db.studies_for_key(key)
        return study_ref(studies[0]) if len(studies) == 1 else None

    def _read_stable(self, path: Path, seen: Observation) -> bytes:
        """Read the file; raise _Changed if it was rewritten since the poll or during the read.

        One descriptor, opened with ``O_NOFOLLOW`` (a name swapped for a symlink since the
        poll's lstat fails with ELOOP instead of reading the link's target) and ``O_NONBLOCK``
        (a FIFO swapped in cannot block the poll); ``fstat`` on that descriptor then checks it is
        the regular file the poll saw, so no check and use ever look at two different files.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise _Changed
            if (before.st_size, before.st_mtime_ns) != (seen.size, seen.mtime_ns):
                raise _Changed
            if before.st_size > self.max_bytes:
                return b""  # size is checked in _parse from the observation; never read huge files
            data = _read_at_most(fd, before.st_size + 1)  # a file that grew shows as changed
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
            data
        ) != after.st_size:
            raise _Changed
        return data

    def _parse(self, path: Path, data: bytes) -> tuple[str, str, str, str | None]:
        size = self._seen[path.name].size
        if size == 0:
            raise _Rejected(Reject.EMPTY, "the file is empty")
        if size > self.max_bytes:
            raise _Rejected(Reject.TOO_LARGE, f"the file exceeds drafts.max_bytes={self.max_bytes}")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _Rejected(Reject.NOT_UTF8, f"not UTF-8 (byte {exc.start})") from None
        suffix = path.suffix.lower()
        if suffix == ".txt":
            parsed = key_of_name(path.stem)
            if parsed is None:
                raise _Rejected(
                    Reject.BAD_NAME,
                    "the name must be <AccessionNumber>.txt or <StudyInstanceUID>.txt",
                )
            if not text.strip():
                raise _Rejected(Reject.EMPTY, "the file holds only white space")
            return parsed[0], parsed[1], text, None
        if suffix == ".json":
            try:
                doc = DraftFile.model_validate(json.loads(text))
            except json.JSONDecodeError as exc:
                raise _Rejected(Reject.BAD_JSON, f"not JSON (line {exc.lineno})") from None
            except RecursionError:  # "[[[[…" deeper than the parser's stack, within max_bytes
                raise _Rejected(Reject.BAD_JSON, "JSON nested too deeply") from None
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise _Rejected(Reject.BAD_JSON, problems) from None
            key, kind = doc.key()
            return key, kind, doc.text, doc.author
        raise _Rejected(Reject.UNSUPPORTED_TYPE, "only .txt and .json drafts are read")

    def _reject(self, path: Path, sha: str, rej: _Rejected) -> None:
        dest = _move_unique(path, self.folder / REJECTED_DIR, sha)
        atomic_write_text(
            dest.with_name(dest.name + REASON_SUFFIX), f"reason: {rej.code}\n{rej.detail}\n"
        )
        self._seen.pop(path.name, None)
        self._count(f"rejected_{rej.code}")
        log.warning(
            "%s rejected (%s)", self.noun, rej.code,
            extra=event(event=self.rejected_event, reason=rej.code),
        )

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.drafts.labels(outcome).inc()


class _Changed(Exception):
    """The draft changed between the poll and the read, or during the read."""


def safe_name(name: str) -> str:
    """A file name with nothing but letters, digits, ``.``, ``_`` and ``-`` (max 120 chars)."""
    cleaned = _UNSAFE_NAME_RE.sub("_", name).lstrip(".") or "draft"
    return cleaned[:120]


def _move_unique(src: Path, folder: Path, sha: str) -> Path:
    """Move ``src`` into ``folder`` without ever replacing a file already there.

    ``os.link`` fails when the target exists, which makes the no-overwrite check atomic;
    collisions get the content hash, then a counter, appended to the stem.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = safe_name(src.name)
    stem, dot, ext = base.rpartition(".") if "." in base else (base, "", "")
    candidates = [base, f"{stem}.{sha[:8]}{dot}{ext}"]
    candidates += [f"{stem}.{sha[:8]}-{n}{dot}{ext}" for n in range(1, 1000)]
    for candidate in candidates:
        dest = folder / candidate
        try:
            # the name is moved, never what it may point to (swapped for a link after the read)
            os.link(src, dest, follow_symlinks=False)
        except FileExistsError:
            continue
        src.unlink()
        return dest
    raise OSError(f"no free name in {folder} for a draft")


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd`` (fewer at end of file)."""
    chunks: list[bytes] = []
    while limit > 0 and (chunk := os.read(fd, min(limit, 1 << 16))):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _os_reason(exc: OSError) -> str:
    """An OSError without its file names (draft names carry accession numbers)."""
    return exc.strerror or type(exc).__name__


def _text_name(name: str) -> str:
    """A file name as storable text: bytes that are not UTF-8 (a Windows share, say) arrive as
    surrogate escapes, which SQLite cannot store; they become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
