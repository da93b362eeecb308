"""C-STORE SCU of results back to configured research destinations, through a durable outbox.

:func:`forward_files` sends files on one association as a Storage SCU (PS3.4 Annex B),
proposing exactly the (SOP Class, Transfer Syntax) pairs of the files it sends: dcmtk's
``storescu`` does not propose Comprehensive 3D SR by default, and a proposal we do not need is
one more thing for the peer to refuse. Failures from pynetdicom and the socket layer become
:class:`ForwardError`, chained with ``from exc``.

Only destinations marked ``research: true`` ever receive results; any other is refused with a
log line, both when queueing and when sending.

The outbox is the ``jobs`` table with ``kind = 'forward'``: one job per (result files,
destination), its payload JSON ``{"destination": name, "files": [...]}``. :func:`drain_outbox`
sends due jobs; a failure schedules a retry with exponential backoff
(``forward.retry_backoff_seconds`` doubling up to ``retry_backoff_max_seconds``), and after
``forward.max_attempts`` the job is dead with its last error kept. The clock is a parameter, so
tests never sleep.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from dicom_agent.config import AgentSettings, Destination, ForwardSettings
from dicom_agent.errors import ForwardError, StateError
from dicom_agent.state import JobKind, JobRow, JobState, StateDB, retry_delay

logger = logging.getLogger(__name__)

# PS3.4 Annex B.2.3: Success and the three Warning statuses (coercion, elements discarded,
# dataset does not match the SOP class) all mean the instance was stored.
_STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


def _tls_args(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """Client TLS context: the CA verifies the peer; our certificate if the peer asks for one."""
    if not dest.tls.enabled:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(dest.tls.ca_file) if dest.tls.ca_file else None,
        )
        if dest.tls.cert_file is not None:
            context.load_cert_chain(
                str(dest.tls.cert_file), str(dest.tls.key_file) if dest.tls.key_file else None
            )
    except (OSError, ssl.SSLError) as exc:
        raise ForwardError(f"destination {dest.name}: TLS files cannot be loaded") from exc
    return context, dest.host


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise ForwardError(f"result file {path.name} cannot be read for sending") from exc


def forward_files(dest: Destination, files: list[Path], *, calling_ae: str) -> None:
    """Send ``files`` to ``dest`` on one association; raise ForwardError unless all are stored."""
    if not dest.research:
        logger.warning("destination %s is not marked research; results are not sent to it", dest.name)
        raise ForwardError(f"destination {dest.name} is not marked research: true")
    if not files:
        return
    # Headers only: each file is read whole by pynetdicom when its turn comes, so a batch of
    # large Secondary Captures is never in memory at once.
    headers = [_read_header(path) for path in files]
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers})
    if len(contexts) > _MAX_CONTEXTS:
        raise ForwardError(f"{len(contexts)} presentation contexts exceed the PS3.8 limit of 128")
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls_args(dest))
    except (OSError, ValueError, RuntimeError, ssl.SSLError) as exc:
        raise ForwardError(f"destination {dest.name}: association failed") from exc
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "failed (peer unreachable or aborted)"
        raise ForwardError(f"destination {dest.name} ({dest.host}:{dest.port}): association {reason}")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code not in _STORED_STATUSES:
                shown = "no response" if code is None else f"0x{code:04X}"
                raise ForwardError(f"destination {dest.name} did not store {path.name}: {shown}")
            if code != 0x0000:
                logger.warning("destination %s stored %s with warning 0x%04X", dest.name, path.name, code)
    except (OSError, ValueError, RuntimeError, AttributeError) as exc:
        raise ForwardError(f"destination {dest.name}: C-STORE failed") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("forwarded %d result objects to %s", len(files), dest.name)


def enqueue_forward(
    db: StateDB,
    study_uid: str,
    files: list[Path],
    destinations: list[Destination],
    *,
    now: float | None = None,
) -> list[int]:
    """Queue ``files`` for each research destination; returns the new job ids."""
    now = time.time() if now is None else now
    ids: list[int] = []
    with db.transaction() as conn:
        for dest in destinations:
            if not dest.research:
                logger.warning(
                    "destination %s is not marked research; results are not queued for it", dest.name
                )
                continue
            payload = json.dumps({"destination": dest.name, "files": [str(p) for p in files]})
            cur = conn.execute(
                "INSERT INTO jobs (kind, study_instance_uid, state, attempts, next_attempt_at,"
                " payload, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                (JobKind.FORWARD.value, study_uid, JobState.QUEUED.value, 0, now, payload, now, now),
            )
            ids.append(int(cur.lastrowid or 0))
    return ids


def backoff_seconds(attempts: int, forward: ForwardSettings) -> float:
    """Delay before the next try after ``attempts`` failures: base doubling, capped."""
    return retry_delay(attempts, forward.retry_backoff_seconds, forward.retry_backoff_max_seconds)


def _claim(db: StateDB, job: JobRow, now: float) -> JobRow | None:
    """Move a due job to running (counting the attempt); None when another drainer took it."""
    try:
        return db.transition_job(job.id, JobState.RUNNING, now)
    except StateError:
        return None


def _finish(db: StateDB, job: JobRow, now: float, error: str | None, forward: ForwardSettings) -> None:
    """Done, back to the queue with backoff, or dead after ``forward.max_attempts``."""
    if error is None:
        db.transition_job(job.id, JobState.DONE, now)
    elif job.attempts >= forward.max_attempts:
        logger.error("forward job %d dead after %d attempts", job.id, job.attempts)
        db.transition_job(job.id, JobState.DEAD, now, error=error)
    else:
        next_at = now + backoff_seconds(job.attempts, forward)
        logger.warning(
            "forward job %d failed (attempt %d); retry at %.0f", job.id, job.attempts, next_at
        )
        db.transition_job(job.id, JobState.QUEUED, now, error=error, next_attempt_at=next_at)


def drain_outbox(db: StateDB, settings: AgentSettings, now: float) -> int:
    """Send every forward job due at ``now``; returns how many were delivered."""
    rows = db.query(
        "SELECT * FROM jobs WHERE kind=? AND state=? AND next_attempt_at<=? ORDER BY id",
        (JobKind.FORWARD.value, JobState.QUEUED.value, now),
    )
    destinations = {d.name: d for d in settings.forward.destinations}
    delivered = 0
    for row in rows:
        claimed = _claim(db, JobRow(**dict(row)), now)
        if claimed is None:
            continue  # another drainer took it
        job = claimed
        error: str | None = None
        try:
            payload = json.loads(job.payload or "{}")
            dest = destinations.get(payload.get("destination", ""))
            if dest is None:
                raise ForwardError("destination of this job is no longer configured")
            forward_files(
                dest,
                [Path(p) for p in payload.get("files", [])],
                calling_ae=settings.forward.calling_ae_title,
            )
        except (ForwardError, ValueError) as exc:
            error = str(exc)
        except Exception as exc:
            # not ours to swallow, but the claimed row must not stay "running" until a restart
            _finish(db, job, now, f"unexpected {type(exc).__name__}", settings.forward)
            raise
        _finish(db, job, now, error, settings.forward)
        delivered += error is None
    return delivered
