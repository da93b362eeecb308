"""The DICOM listener: Verification and Storage SCP (PS3.4 Annex A and Annex B) on pynetdicom.

One function per DIMSE service (:func:`handle_echo`, :func:`handle_store`), bound with their
dependencies through ``evt_handlers``; notification handlers only log. Calling AE titles are
checked at association time (``require_calling_aet``) and the called AE title must be ours.
The data set arrives in a spool file as it is received (:mod:`dicom_agent.transport`); a
C-STORE is answered Success only once every element of it was read back
(:func:`~dicom_agent.spool.check_data_set`) and :class:`~dicom_agent.spool.Spool` has the file
fsynced, renamed and its state row committed. Every failure maps to a named status from
:mod:`dicom_agent.conformance`, and nothing is raised into pynetdicom.

The transport (bounded PDU reads, timeouts, streaming) lives in :mod:`dicom_agent.transport`,
the extra listener processes of ``scp.workers`` in :mod:`dicom_agent.listener_pool`.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)

from dicom_agent import conformance as dc
from dicom_agent import observe
from dicom_agent.config import AgentSettings
from dicom_agent.errors import (
    DicomInputError,
    InstanceTooLargeError,
    SpoolError,
    SpoolFullError,
    StateError,
)
from dicom_agent.incoming import IncomingFile
from dicom_agent.listener_pool import WorkerPool, start_workers
from dicom_agent.spool import FreeSpaceProbe, Spool
from dicom_agent.state import StateDB, StoreOutcome
from dicom_agent.transport import (
    Counters,
    ListenerAE,
    ListenerRequestHandler,
    ListenerServer,
    ReceiveLimits,
    RefusedDataSet,
    ReusePortServer,
    on_bound_socket,
    server_ssl_context,
)

logger = logging.getLogger(__name__)

OnStored = Callable[[str], None]

_SHUTDOWN_POLL_SECONDS = 0.1  # how long stop() may wait for the accept loop to notice
_ERROR_COMMENT_MAX = 64  # LO VR (PS3.5 6.2)


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902) for the peer's log."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


# -- handlers -----------------------------------------------------------------------------------


def handle_echo(event: Event) -> int:
    """Handle a C-ECHO request (``evt.EVT_C_ECHO``): Verification Service Class, PS3.4 Annex A.

    Returns ``0x0000`` Success; the association itself already proved the peer may talk to us.
    """
    logger.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return dc.STATUS_SUCCESS


@dataclass
class _StoreContext:
    """Dependencies of :func:`handle_store`, bound once per listener."""

    spool: Spool
    on_stored: OnStored | None = None
    counters: Counters = field(default_factory=Counters)

    def count(self, key: str) -> None:
        self.counters.count(key)


def handle_store(event: Event, ctx: _StoreContext) -> int | Dataset:
    """Handle a C-STORE request (``evt.EVT_C_STORE``): Storage Service Class, PS3.4 Annex B.

    The data set is written exactly as encoded by the peer (no decode/re-encode) behind a new
    File Meta Information header, as it arrives. Statuses (PS3.4 B.2.3, see
    :mod:`dicom_agent.conformance`):

    * ``0x0000`` Success: every element read back, stored durably and recorded (or an
      identical copy already was, or ``scp.overwrite=keep_first`` kept the first copy).
    * ``0xA700`` Refused, Out of Resources: free space below ``scp.min_free_bytes`` (checked as
      the bytes arrive), disk full, or the state database failed. Nothing half-written
      remains; the peer should retry.
    * ``0xA701`` Refused, Out of Resources: a deflated data set inflates past
      ``scp.max_instance_bytes``; not stored. (A data set that *arrives* larger than that
      has its association aborted while it arrives, see :mod:`dicom_agent.transport`.)
    * ``0xA900`` Error, Data Set Does Not Match SOP Class: the data set's SOP Class or Instance
      UID differs from the command's; the bytes are quarantined.
    * ``0xC210`` Error, Cannot Understand: an element does not decode (invalid VR, a length
      that does not fit its VR, cut short, Pixel Data not OB/OW) or UIDs are missing or
      invalid; the bytes are quarantined with a reason file.
    * ``0xC211`` Error, Cannot Understand: unexpected internal failure (logged with traceback).
    """
    try:
        return _store(event, ctx)
    except Exception:  # the boundary: never raise into pynetdicom
        logger.exception("C-STORE handler failed unexpectedly")
        ctx.count("failed")
        return _status(dc.STATUS_PROCESSING_FAILURE, "internal error while storing")


def _store(event: Event, ctx: _StoreContext) -> int | Dataset:
    request = cast(C_STORE, event.request)
    sink = request._dataset_file
    if isinstance(sink, RefusedDataSet):
        return _out_of_resources(ctx, sink.error)
    if isinstance(sink, IncomingFile):
        incoming = sink
    else:
        # The whole data set came in the P-DATA-TF of the command (one PDU): same path.
        try:
            incoming = ctx.spool.open_incoming(
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
                event.assoc.requestor.ae_title,
            )
            data = request.DataSet
            incoming.write(data.getvalue() if data is not None else b"")
        except InstanceTooLargeError as exc:
            return _too_large(ctx, exc)
        except SpoolError as exc:
            return _out_of_resources(ctx, exc)
    try:
        return _store_incoming(event, ctx, request, incoming)
    finally:
        incoming.discard()  # a no-op once committed (renamed) or quarantined


def _store_incoming(
    event: Event, ctx: _StoreContext, request: C_STORE, incoming: IncomingFile
) -> int | Dataset:
    incoming.complete()  # the writer thread may still hold the last fragments
    if incoming.error is not None:
        return _out_of_resources(ctx, incoming.error)
    try:
        header = ctx.spool.check(incoming)
    except InstanceTooLargeError as exc:
        return _too_large(ctx, exc)
    except DicomInputError as exc:
        return _refuse_malformed(ctx, incoming, dc.STATUS_CANNOT_UNDERSTAND, exc)
    if (
        str(request.AffectedSOPClassUID) != header.sop_class_uid
        or str(request.AffectedSOPInstanceUID) != header.sop_instance_uid
    ):
        mismatch = DicomInputError("command and data set SOP Class/Instance UIDs differ")
        return _refuse_malformed(ctx, incoming, dc.STATUS_DATASET_MISMATCH, mismatch)
    try:
        result = ctx.spool.commit(incoming, header)
    except (SpoolError, StateError) as exc:
        return _out_of_resources(ctx, exc)
    ctx.count(result.outcome.value)
    if not dc.is_auditable(header.sop_class_uid):
        logger.info(
            "stored instance of SOP class %s outside the audit set: ignored, never audited",
            header.sop_class_uid,
        )
    ref = observe.study_ref(header.study_instance_uid)
    if result.outcome is StoreOutcome.KEPT_FIRST:
        logger.warning(
            "instance with different bytes under a stored SOP Instance UID, study=%s: "
            "first copy kept (scp.overwrite=keep_first)",
            ref,
        )
    logger.info(
        "instance.stored study=%s outcome=%s sop_class=%s",
        ref,
        result.outcome.value,
        header.sop_class_uid,
        extra=observe.event(
            event=observe.Event.INSTANCE_STORED, study=ref, reason=result.outcome.value
        ),
    )
    if ctx.on_stored is not None and result.outcome in (StoreOutcome.NEW, StoreOutcome.REPLACED):
        try:
            ctx.on_stored(header.study_instance_uid)
        except Exception:
            logger.exception("on_stored callback failed")
    return dc.STATUS_SUCCESS


def _out_of_resources(ctx: _StoreContext, exc: SpoolError | StateError) -> Dataset:
    ctx.count("out_of_resources")
    if isinstance(exc, SpoolFullError):
        logger.warning("C-STORE refused, out of resources: %s", exc)
        return _status(dc.STATUS_OUT_OF_RESOURCES, "storage full, retry later")
    logger.error("C-STORE refused, storage failed: %s", exc)
    return _status(dc.STATUS_OUT_OF_RESOURCES, "storage failed, retry later")


def _too_large(ctx: _StoreContext, exc: InstanceTooLargeError) -> Dataset:
    logger.warning("C-STORE refused: %s", exc)
    ctx.count("too_large")
    return _status(dc.STATUS_REFUSED_TOO_LARGE, "instance exceeds max_instance_bytes")


def _refuse_malformed(
    ctx: _StoreContext, incoming: IncomingFile, code: int, exc: DicomInputError
) -> Dataset:
    ctx.count("malformed")
    try:
        kept = ctx.spool.quarantine_incoming(incoming, str(exc))
        logger.warning("C-STORE refused (0x%04X): %s; quarantined as %s", code, exc, kept.name)
    except SpoolError:
        logger.warning("C-STORE refused (0x%04X): %s; not quarantined (free-space floor)", code, exc)
    except OSError as qexc:
        logger.error("C-STORE refused (0x%04X): %s; quarantine failed: %s", code, exc, qexc.strerror)
    return _status(code, str(exc))


# -- notification handlers (log only) ---------------------------------------------------------


def _peer(event: Event) -> str:
    info = event.assoc.requestor
    return f"{info.ae_title or '?'}@{info.address}:{info.port}"


def _on_conn_open(event: Event) -> None:
    logger.debug("connection opened from %s", event.assoc.requestor.address)


def _on_accepted(event: Event) -> None:
    rejected = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
    # scp.unknown_sop_class=reject: storescu and most archives propose every class they know on
    # each association, so the list of refused classes runs to kilobytes: a count at INFO,
    # the classes themselves at DEBUG.
    logger.info(
        "association accepted from %s (%d SOP classes refused)", _peer(event), len(rejected)
    )
    if rejected:
        logger.debug(
            "association from %s: presentation contexts rejected for %s",
            _peer(event),
            ", ".join(rejected),
        )


def _on_rejected(event: Event) -> None:
    logger.warning("association rejected from %s", _peer(event))


def _on_aborted(event: Event) -> None:
    logger.warning("association aborted with %s", _peer(event))


def _on_released(event: Event) -> None:
    logger.debug("association released by %s", _peer(event))


_NOTIFICATION_HANDLERS: list[tuple[Any, Callable[[Event], None]]] = [
    (evt.EVT_CONN_OPEN, _on_conn_open),
    (evt.EVT_ACCEPTED, _on_accepted),
    (evt.EVT_REJECTED, _on_rejected),
    (evt.EVT_ABORTED, _on_aborted),
    (evt.EVT_RELEASED, _on_released),
]


def presentation_contexts(unknown_sop_class: str) -> list[PresentationContext]:
    """The contexts we accept as SCP: Verification and the Storage classes.

    With ``reject`` only the auditable classes are offered, so pynetdicom rejects any other
    abstract syntax during negotiation (PS3.8 9.3.3.2, result 3). With ``ignore`` every storage
    class pynetdicom knows is accepted; the extra ones are stored but never audited.
    """
    syntaxes = list(dc.ACCEPTED_TRANSFER_SYNTAXES)
    contexts = [build_context(dc.VERIFICATION_SOP_CLASS)]
    if unknown_sop_class == "ignore":
        classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        classes += [uid for uid in dc.AUDITABLE_STORAGE_SOP_CLASSES if uid not in classes]
    else:
        classes = list(dc.AUDITABLE_STORAGE_SOP_CLASSES)
    contexts += [build_context(uid, syntaxes) for uid in classes]
    return contexts


@dataclass
class Listener:
    """A running listener; :meth:`stop` shuts it down (and its worker processes)."""

    server: ListenerServer
    ae: ListenerAE
    port: int
    store_context: _StoreContext
    pool: WorkerPool | None = None
    _stopped: bool = False

    @property
    def stats(self) -> dict[str, int]:
        """Counters of this process since start: C-STORE outcomes (new, duplicate, ...) and
        refusals (too_large, out_of_resources, pdu_too_long, connections_refused,
        per_address_limit, ...)."""
        return self.store_context.counters.snapshot()

    def stop(self) -> None:
        """Stop accepting, close the listening socket and abort open associations.

        Idempotent: a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self.pool is not None:
            self.pool.stop_event.set()
        self.server.shutdown()
        for assoc in self.server.active_associations:
            assoc.abort()
        self.store_context.spool.close()
        if self.pool is not None:
            self.pool.stop()


def start_listener(
    settings: AgentSettings,
    db: StateDB,
    *,
    free_space: FreeSpaceProbe | None = None,
    on_stored: OnStored | None = None,
    bound: socket.socket | None = None,
) -> Listener:
    """Start the Verification/Storage SCP in background threads and return at once.

    ``free_space`` replaces the disk probe (tests); ``on_stored(study_uid)`` is called after
    each instance is durably stored (new or replaced; not for a duplicate or a kept first copy).
    ``bound`` is a socket already bound to ``scp.host:scp.port`` (serve binds it before any
    state work); the listener takes it over instead of binding again.

    With ``scp.workers`` > 1, ``workers - 1`` more listener processes bind the same port
    (:mod:`dicom_agent.listener_pool`) so associations use more than one core. They use the
    default disk probe; ``on_stored`` fires only for instances this process received, so a
    scheduler must not rely on it alone (it is a wake-up hint, the state DB is the truth).
    """
    scp = settings.scp
    if not scp.allowed_calling_aets:
        logger.warning("scp.allowed_calling_aets is empty: any calling AE title is accepted")
    listener = _start_one(settings, db, free_space, on_stored, bound)
    if scp.workers > 1:
        worker_settings = settings.model_copy(
            update={"scp": scp.model_copy(update={"port": listener.port})}
        )
        try:
            listener.pool = start_workers(worker_settings, scp.workers - 1, serve_in_worker)
        except BaseException:
            listener.stop()
            raise
    return listener


def serve_in_worker(settings: AgentSettings, ready: EventType, stop: EventType) -> None:
    """A listener worker's service (see :mod:`dicom_agent.listener_pool`): serve until ``stop``."""
    db = StateDB(settings.paths.state)
    listener = _start_one(settings, db, None, None)
    ready.set()
    stop.wait()
    listener.stop()
    db.close()


def _start_one(
    settings: AgentSettings,
    db: StateDB,
    free_space: FreeSpaceProbe | None,
    on_stored: OnStored | None,
    bound: socket.socket | None = None,
) -> Listener:
    """One listening socket with its accept thread, in this process."""
    scp = settings.scp
    ssl_context = server_ssl_context(scp)
    spool = Spool(
        settings.paths.spool,
        db,
        settings.paths.quarantine,
        min_free_bytes=scp.min_free_bytes,
        free_space=free_space,
        max_instance_bytes=scp.max_instance_bytes,
        overwrite=scp.overwrite,
        sync_step_bytes=scp.sync_step_bytes,
    )
    store_context = _StoreContext(spool, on_stored)

    ae = ListenerAE(ae_title=scp.ae_title)
    ae.implementation_class_uid = dc.IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = dc.IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = scp.max_associations
    ae.maximum_pdu_size = scp.max_pdu_bytes
    ae.acse_timeout = scp.acse_timeout_seconds
    ae.dimse_timeout = scp.dimse_timeout_seconds
    ae.network_timeout = scp.network_timeout_seconds
    ae.require_called_aet = True
    ae.require_calling_aet = list(scp.allowed_calling_aets)
    ae.supported_contexts = presentation_contexts(scp.unknown_sop_class)

    server_class = ReusePortServer if scp.workers > 1 else ListenerServer
    if bound is not None:
        server_class = on_bound_socket(server_class, bound)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store_context]),
        *_NOTIFICATION_HANDLERS,
    ]
    server = cast(
        ListenerServer,
        ae.make_server(
            (scp.host, scp.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=server_class,
            request_handler=ListenerRequestHandler,
        ),
    )
    # Before the accept loop starts: every connection sees them.
    server.limits = ReceiveLimits.from_settings(scp)
    server.spool = spool
    server.counters = store_context.counters
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _SHUTDOWN_POLL_SECONDS},
        name="dicom-listener",
        daemon=True,
    )
    thread.start()
    # As AE.start_server does: server.shutdown() removes itself from this list.
    ae._servers.append(server)
    port = int(server.server_address[1])
    logger.info(
        "DICOM listener %s on %s:%d (tls=%s, unknown_sop_class=%s)",
        scp.ae_title,
        scp.host,
        port,
        ssl_context is not None,
        scp.unknown_sop_class,
    )
    return Listener(server=server, ae=ae, port=port, store_context=store_context)
