"""C-STORE SCU of results back to configured research destinations, through a durable outbox.

:func:`forward_files` sends files on one association as a Storage SCU (PS3.4 Annex B),
proposing exactly the (SOP Class, Transfer Syntax) pairs of the files it sends: dcmtk's
``storescu`` does not propose Comprehensive 3D SR by default, and a proposal we do not need is
one more thing for the peer to refuse. Failures from pynetdicom and the socket layer become
:class:`ForwardError`, chained with ``from exc``; failures that retrying cannot cure become
:class:`ForwardRefused`.

Only destinations marked ``research: true`` ever receive results; any other is refused with a
log line, both when queueing and when sending.

Every wait is bounded. pynetdicom's AE timeouts bound the connect (``connection_timeout``), the
A-ASSOCIATE/A-RELEASE answers (``acse_timeout``) and each C-STORE response (``dimse_timeout``);
pynetdicom clears the socket timeout once connected, so a connection-open handler sets
``network_timeout`` on the socket again, which bounds a peer that stalls mid-PDU or stops
reading. On top, :func:`drain_outbox` runs each job in a thread under a watchdog
(``forward.job_timeout_seconds``): past it, the association's socket is shut down and the job
fails, so one stalled PACS cannot hold the outbox (a single scheduler job) for ever.

The outbox is the ``jobs`` table with ``kind = 'forward'``: one job per (result files,
destination), its payload JSON ``{"destination": name, "files": [...]}``. A transient failure
schedules a retry with exponential backoff (``forward.retry_backoff_seconds`` doubling up to
``retry_backoff_max_seconds``) until ``forward.max_attempts``; a permanent one
(:class:`ForwardRefused`) makes the job dead at once. ``cxr-agent forward retry`` re-queues dead
jobs. The clock is a parameter, so tests never sleep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_agent.config import AgentSettings, Destination, ForwardSettings
from dicom_agent.errors import AgentError, ForwardError, ForwardRefused, OutputError, StateError
from dicom_agent.observe import Event, event, study_ref
from dicom_agent.outputs.layout import SIDECAR_NAME, objects_to_send, read_result, study_dir
from dicom_agent.state import JobRow, JobState, StateDB

logger = logging.getLogger(__name__)

# PS3.4 Annex B.2.3: Success and the three Warning statuses (coercion, elements discarded,
# dataset does not match the SOP class) all mean the instance was stored.
_STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255
# PS3.8 9.3.4: A-ASSOCIATE-RJ result 1 is "rejected-permanent" (2 is transient).
_REJECTED_PERMANENT = 0x01
# After the watchdog shuts the socket, pynetdicom notices at once (recv returns, send fails);
# this bounds the wait for its threads to wind down before the job is failed anyway.
_CUT_GRACE_SECONDS = 5.0

#: Hook called with the association's socket as soon as it is connected.
SocketHook = Callable[[socket.socket], None]


def refused_for_good(status: int) -> bool:
    """True for C-STORE failure statuses that sending again cannot cure.

    PS3.4 Annex B.2.3: 0xA9xx "data set does not match SOP class" and 0xCxxx "cannot
    understand"; PS3.7 C.4.2: 0x0122 "SOP class not supported". 0xA7xx (out of resources) and
    the rest stay transient.
    """
    return status == 0x0122 or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


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
    except (FileNotFoundError, InvalidDicomError) as exc:
        raise ForwardRefused(f"result file {path.name} is missing or not DICOM") from exc
    except OSError as exc:
        raise ForwardError(f"result file {path.name} cannot be read for sending") from exc


def _bounded_ae(calling_ae: str, forward: ForwardSettings) -> AE:
    """An AE whose every wait is bounded by the ``forward.*_timeout_seconds`` settings."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = forward.connect_timeout_seconds
    ae.acse_timeout = forward.acse_timeout_seconds
    ae.dimse_timeout = forward.dimse_timeout_seconds
    ae.network_timeout = forward.network_timeout_seconds
    return ae


def _association_failure(dest: Destination, assoc: Association) -> ForwardError:
    """The error for an association that was not established, permanent where it is."""
    where = f"destination {dest.name} ({dest.host}:{dest.port})"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        if result == _REJECTED_PERMANENT:
            return ForwardRefused(f"{where}: association rejected (permanent)")
        return ForwardError(f"{where}: association rejected (transient)")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return ForwardRefused(f"{where}: association refused every presentation context")
    return ForwardError(f"{where}: association failed (peer unreachable, timed out or aborted)")


def forward_files(
    dest: Destination,
    files: list[Path],
    *,
    calling_ae: str,
    forward: ForwardSettings | None = None,
    on_socket: SocketHook | None = None,
) -> None:
    """Send ``files`` to ``dest`` on one association; raise ForwardError unless all are stored.

    ``forward`` supplies the timeouts (defaults when None); ``on_socket`` receives the
    connected socket (the watchdog of :func:`drain_outbox` uses it to cut a stalled peer).
    """
    if not dest.research:
        logger.warning("destination %s is not marked research; results are not sent to it", dest.name)
        raise ForwardRefused(f"destination {dest.name} is not marked research: true")
    if not files:
        return
    limits = forward if forward is not None else ForwardSettings()
    # Headers only: each file is read whole by pynetdicom when its turn comes, so a batch of
    # large Secondary Captures is never in memory at once.
    headers = [_read_header(path) for path in files]
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers})
    if len(contexts) > _MAX_CONTEXTS:
        raise ForwardRefused(f"{len(contexts)} presentation contexts exceed the PS3.8 limit of 128")
    ae = _bounded_ae(calling_ae, limits)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])

    def connected(event: evt.Event) -> None:
        # pynetdicom sets connection_timeout for connect() and then None: a peer that stops
        # mid-PDU or stops reading would block the association's thread for ever.
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.settimeout(limits.network_timeout_seconds)
            if on_socket is not None:
                on_socket(sock)

    try:
        assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls_args(dest),
            evt_handlers=[(evt.EVT_CONN_OPEN, connected)],
        )
    except (OSError, ValueError, RuntimeError, ssl.SSLError) as exc:
        raise ForwardError(f"destination {dest.name}: association failed") from exc
    if not assoc.is_established:
        raise _association_failure(dest, assoc)
    refused = {(str(cx.abstract_syntax), str(ts)) for cx in assoc.rejected_contexts
               for ts in cx.transfer_syntax}
    try:
        if refused & set(contexts):
            raise ForwardRefused(
                f"destination {dest.name} refused {len(refused & set(contexts))} of the"
                " presentation contexts needed"
            )
        for path in files:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code in _STORED_STATUSES:
                if code != 0x0000:
                    logger.warning(
                        "destination %s stored %s with warning 0x%04X", dest.name, path.name, code
                    )
                continue
            if code is None:
                raise ForwardError(f"destination {dest.name} did not store {path.name}: no response")
            error = ForwardRefused if refused_for_good(code) else ForwardError
            raise error(f"destination {dest.name} did not store {path.name}: 0x{code:04X}")
    except (OSError, ValueError, RuntimeError, AttributeError) as exc:
        raise ForwardError(f"destination {dest.name}: C-STORE failed") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("forwarded %d result objects to %s", len(files), dest.name)


def _cut(sock: socket.socket) -> None:
    """Shut a socket down from another thread: the thread blocked on it wakes with an error."""
    with contextlib.suppress(OSError):  # already closed by pynetdicom: nothing left to cut
        sock.shutdown(socket.SHUT_RDWR)


def send_with_watchdog(dest: Destination, files: list[Path], forward: ForwardSettings) -> None:
    """:func:`forward_files` in a thread of its own, cut after ``forward.job_timeout_seconds``.

    The per-wait timeouts should end any stall first; the watchdog is the guarantee that one
    job cannot hold the outbox for ever whatever pynetdicom does (its ``Association.kill``
    loops until the DUL thread stops, and that thread may be blocked in a send).
    """
    sockets: list[socket.socket] = []
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            forward_files(
                dest, files, calling_ae=forward.calling_ae_title, forward=forward,
                on_socket=sockets.append,
            )
        except BaseException as exc:  # handed to the calling thread below
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=run, name=f"forward-{dest.name}", daemon=True)
    worker.start()
    worker.join(forward.job_timeout_seconds)
    if worker.is_alive():
        for sock in sockets:
            _cut(sock)
        worker.join(_CUT_GRACE_SECONDS)
        if worker.is_alive():
            logger.error("forward thread for %s did not stop after its socket was cut", dest.name)
        raise ForwardError(
            f"destination {dest.name}: job still sending after"
            f" {forward.job_timeout_seconds:.0f} s (forward.job_timeout_seconds); association cut"
        )
    if outcome and outcome[0] is not None:
        raise outcome[0]


@dataclass(frozen=True)
class Resend:
    """What :func:`queue_resend` queued: the result version, its files, one job per destination."""

    result_version: int
    files: list[Path]
    job_ids: list[int]


def queue_resend(db: StateDB, settings: AgentSettings, study_uid: str) -> Resend:
    """Queue a study's latest validated SR / GSPS / SC for every research destination: what
    ``cxr-agent resend`` and the results browser's Resend do (the scheduler sends them).

    Raises:
        AgentError: no research destination, no readable ``audit.json``, or nothing validated
            to send (the message says which).
    """
    destinations = [d for d in settings.forward.destinations if d.research]
    if not destinations:
        raise AgentError(
            "no destination with research: true in forward.destinations; see docs/outputs.md"
        )
    folder = study_dir(settings, study_uid)
    try:
        result = read_result(folder / SIDECAR_NAME)
    except OutputError:
        raise AgentError(
            f"no readable {SIDECAR_NAME} for this study under paths.out ({settings.paths.out})"
        ) from None
    files = objects_to_send(folder, result)
    if not files:
        raise AgentError(
            f"result version {result.result_version} has no validated DICOM objects to send"
        )
    return Resend(result.result_version, files, enqueue_forward(db, study_uid, files, destinations))


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
    payloads: list[str] = []
    for dest in destinations:
        if not dest.research:
            logger.warning(
                "destination %s is not marked research; results are not queued for it", dest.name
            )
            continue
        payloads.append(json.dumps({"destination": dest.name, "files": [str(p) for p in files]}))
    return db.queue_forward_jobs(study_uid, payloads, now) if payloads else []


def _claim(db: StateDB, job: JobRow, now: float) -> JobRow | None:
    """Move a due job to running (counting the attempt); None when another drainer took it."""
    try:
        return db.transition_job(job.id, JobState.RUNNING, now)
    except StateError:
        return None


def _finish(
    db: StateDB, job: JobRow, now: float, error: ForwardError | str | None, forward: ForwardSettings
) -> None:
    """Done, or the shared retry-with-backoff-or-dead rule (dead at once when refused)."""
    if error is None:
        db.transition_job(job.id, JobState.DONE, now)
        return
    row = db.fail_job(
        job.id, now, str(error),
        max_attempts=forward.max_attempts,
        backoff_seconds=forward.retry_backoff_seconds,
        backoff_max_seconds=forward.retry_backoff_max_seconds,
        permanent=isinstance(error, ForwardRefused),
    )
    fields = {"job_id": job.id, "study": study_ref(job.study_instance_uid), "attempt": row.attempts}
    if row.state == JobState.DEAD.value:
        why = "refused for good" if isinstance(error, ForwardRefused) else "attempts used up"
        logger.error(
            "forward job dead (%s); `cxr-agent forward retry %d` re-queues it", why, job.id,
            extra=event(event=Event.JOB_DEAD, reason=why, **fields),
        )
    else:
        logger.warning(
            "forward job failed; retry in %.0f s", row.next_attempt_at - now,
            extra=event(event=Event.JOB_RETRY, **fields),
        )


def drain_outbox(db: StateDB, settings: AgentSettings, now: float) -> int:
    """Send every forward job due at ``now``; returns how many were delivered."""
    destinations = {d.name: d for d in settings.forward.destinations}
    delivered = 0
    for due in db.due_forward_jobs(now):
        job = _claim(db, due, now)
        if job is None:
            continue  # another drainer took it
        error: ForwardError | None = None
        try:
            payload = json.loads(job.payload or "{}")
            dest = destinations.get(payload.get("destination", ""))
            if dest is None:
                raise ForwardRefused("destination of this job is no longer configured")
            send_with_watchdog(dest, [Path(p) for p in payload.get("files", [])], settings.forward)
        except ForwardError as exc:
            error = exc
        except ValueError as exc:  # a payload that is not JSON: it will not become JSON later
            error = ForwardRefused(f"job payload unreadable: {type(exc).__name__}")
        except Exception as exc:
            # not ours to swallow, but the claimed row must not stay "running" until a restart
            _finish(db, job, now, f"unexpected {type(exc).__name__}", settings.forward)
            raise
        _finish(db, job, now, error, settings.forward)
        delivered += error is None
    return delivered
