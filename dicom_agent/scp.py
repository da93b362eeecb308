"""The DICOM listener: Verification and Storage SCP (PS3.4 Annex A and Annex B) on pynetdicom.

One function per DIMSE service (:func:`handle_echo`, :func:`handle_store`), bound with their
dependencies through ``evt_handlers``; notification handlers only log. Calling AE titles are
checked at association time (``require_calling_aet``) and the called AE title must be ours.
A C-STORE is answered Success only once :class:`~dicom_agent.spool.Spool` has the file fsynced,
renamed and its state row committed; every failure maps to a named status from
:mod:`dicom_agent.conformance`, and nothing is raised into pynetdicom.

Transport: TCP_NODELAY on every accepted socket (PS3.8 exchanges small PDUs, request/response;
Nagle would add delayed-ACK stalls), large PDU reads, optional TLS (PS3.15 Annex B.1) with
client-certificate verification, and SO_REUSEPORT when several listener processes share a port.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _handlers, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_agent import conformance as dc
from dicom_agent import observe
from dicom_agent.config import AgentSettings, SCPSettings
from dicom_agent.errors import (
    AgentError,
    ConfigError,
    DicomInputError,
    SpoolError,
    SpoolFullError,
    StateError,
)
from dicom_agent.spool import FreeSpaceProbe, Spool, read_header
from dicom_agent.state import StateDB, StoreOutcome

logger = logging.getLogger(__name__)

OnStored = Callable[[str], None]

_RECV_CHUNK = 1 << 20
_SHUTDOWN_POLL_SECONDS = 0.1  # how long stop() may wait for the accept loop to notice
_WORKER_START_SECONDS = 60.0
_WORKER_STOP_SECONDS = 10.0
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
    max_instance_bytes: int
    on_stored: OnStored | None = None
    stats: dict[str, int] = field(default_factory=dict)
    _stats_lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + 1


def handle_store(event: Event, ctx: _StoreContext) -> int | Dataset:
    """Handle a C-STORE request (``evt.EVT_C_STORE``): Storage Service Class, PS3.4 Annex B.

    The data set is written exactly as encoded by the peer (no decode/re-encode) behind a new
    File Meta Information header. Statuses (PS3.4 B.2.3, see :mod:`dicom_agent.conformance`):

    * ``0x0000`` Success: stored durably and recorded (or an identical copy already was).
    * ``0xA700`` Refused, Out of Resources: free space below ``scp.min_free_bytes``, disk full,
      or the state database failed. Nothing half-written remains; the peer should retry.
    * ``0xA701`` Refused, Out of Resources: larger than ``scp.max_instance_bytes``; not stored.
    * ``0xA900`` Error, Data Set Does Not Match SOP Class: the data set's SOP Class or Instance
      UID differs from the command's; the bytes are quarantined.
    * ``0xC210`` Error, Cannot Understand: undecodable header or missing/invalid UIDs; the bytes
      are quarantined with a reason file.
    * ``0xC211`` Error, Cannot Understand: unexpected internal failure (logged with traceback).
    """
    try:
        return _store(event, ctx)
    except Exception:  # the boundary: never raise into pynetdicom
        logger.exception("C-STORE handler failed unexpectedly")
        ctx.count("failed")
        return _status(dc.STATUS_PROCESSING_FAILURE, "internal error while storing")


def _store(event: Event, ctx: _StoreContext) -> int | Dataset:
    transfer_syntax = str(event.context.transfer_syntax)
    data_set = event.encoded_dataset(include_meta=False)
    if len(data_set) > ctx.max_instance_bytes:
        logger.warning(
            "C-STORE refused: %d bytes exceeds scp.max_instance_bytes=%d",
            len(data_set),
            ctx.max_instance_bytes,
        )
        ctx.count("too_large")
        return _status(dc.STATUS_REFUSED_TOO_LARGE, "instance exceeds max_instance_bytes")
    try:
        header = read_header(data_set, transfer_syntax)
    except DicomInputError as exc:
        return _refuse_malformed(ctx, data_set, transfer_syntax, dc.STATUS_CANNOT_UNDERSTAND, exc)
    request = cast(C_STORE, event.request)
    if (
        str(request.AffectedSOPClassUID) != header.sop_class_uid
        or str(request.AffectedSOPInstanceUID) != header.sop_instance_uid
    ):
        mismatch = DicomInputError("command and data set SOP Class/Instance UIDs differ")
        return _refuse_malformed(ctx, data_set, transfer_syntax, dc.STATUS_DATASET_MISMATCH, mismatch)
    try:
        result = ctx.spool.store(
            data_set,
            transfer_syntax,
            header=header,
            source_ae_title=event.assoc.requestor.ae_title,
        )
    except SpoolFullError as exc:
        logger.warning("C-STORE refused, out of resources: %s", exc)
        ctx.count("out_of_resources")
        return _status(dc.STATUS_OUT_OF_RESOURCES, "storage full, retry later")
    except (SpoolError, StateError) as exc:
        logger.error("C-STORE refused, storage failed: %s", exc)
        ctx.count("out_of_resources")
        return _status(dc.STATUS_OUT_OF_RESOURCES, "storage failed, retry later")
    ctx.count(result.outcome.value)
    if not dc.is_auditable(header.sop_class_uid):
        logger.info(
            "stored instance of SOP class %s outside the audit set: ignored, never audited",
            header.sop_class_uid,
        )
    ref = observe.study_ref(header.study_instance_uid)
    logger.info(
        "instance.stored study=%s outcome=%s sop_class=%s",
        ref,
        result.outcome.value,
        header.sop_class_uid,
        extra=observe.event(
            event=observe.Event.INSTANCE_STORED, study=ref, reason=result.outcome.value
        ),
    )
    if ctx.on_stored is not None and result.outcome is not StoreOutcome.DUPLICATE:
        try:
            ctx.on_stored(header.study_instance_uid)
        except Exception:
            logger.exception("on_stored callback failed")
    return dc.STATUS_SUCCESS


def _refuse_malformed(
    ctx: _StoreContext, data_set: bytes, transfer_syntax: str, code: int, exc: DicomInputError
) -> Dataset:
    ctx.count("malformed")
    try:
        kept = ctx.spool.quarantine(data_set, str(exc), transfer_syntax)
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


# -- transport --------------------------------------------------------------------------------


class _AssociationSocket(AssociationSocket):
    """Reads each PDU with a few large ``recv_into`` calls instead of 4 KiB ``recv`` calls.

    pynetdicom reads a whole PDU per call; at 1 MiB PDUs its 4 KiB loop costs a few thousand
    Python iterations per 10 MB image, time taken from every other association thread.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], min(nr_bytes - got, _RECV_CHUNK))
            if not n:
                # Connection closed: hand back the short read, as pynetdicom does.
                del view
                del buf[got:]
                return buf
            got += n
        return buf


# pynetdicom's standard loggers run on every PDU and DIMSE message even with DEBUG off; the
# C-STORE one compares the whole received data set with b"" just to print "Present".
_STANDARD_LOGGERS = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        for event, handler in _STANDARD_LOGGERS:
            assoc.unbind(event, handler)
        # Re-class rather than re-create: constructing a second socket would queue a second
        # transport-connection event (Evt5) into the state machine. The subclass adds no state.
        assoc.dul.socket.__class__ = _AssociationSocket
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with our socket options."""

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            # The handshake happens on the association thread's first read, so a peer that
            # never completes it stalls only itself, not the accept loop.
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


class _ReusePortServer(_Server):
    reuse_port = True


def server_ssl_context(settings: SCPSettings) -> ssl.SSLContext | None:
    """The TLS context for ``scp.tls`` (PS3.15 B.1 secure transport), or None when disabled."""
    tls = settings.tls
    if not tls.enabled:
        return None
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("scp.tls: cert_file and key_file are required when tls.enabled")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if tls.require_client_cert:
            if tls.ca_file is None:
                raise ConfigError("scp.tls.ca_file is required when require_client_cert")
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"scp.tls: cannot load certificates: {exc}") from exc
    return context


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

    server: ThreadedAssociationServer
    ae: AE
    port: int
    store_context: _StoreContext
    workers: list[BaseProcess] = field(default_factory=list)
    _stop_workers: EventType | None = None
    _stopped: bool = False

    @property
    def stats(self) -> dict[str, int]:
        """C-STORE outcome counters of this process since start (new, duplicate, ...)."""
        return dict(self.store_context.stats)

    def stop(self) -> None:
        """Stop accepting, close the listening socket and abort open associations.

        Idempotent: a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._stop_workers is not None:
            self._stop_workers.set()
        self.server.shutdown()
        for assoc in self.server.active_associations:
            assoc.abort()
        self.store_context.spool.close()
        for proc in self.workers:
            proc.join(timeout=_WORKER_STOP_SECONDS)
            if proc.is_alive():
                logger.warning("listener worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join()


def start_listener(
    settings: AgentSettings,
    db: StateDB,
    *,
    free_space: FreeSpaceProbe | None = None,
    on_stored: OnStored | None = None,
) -> Listener:
    """Start the Verification/Storage SCP in background threads and return at once.

    ``free_space`` replaces the disk probe (tests); ``on_stored(study_uid)`` is called after
    each instance is durably stored (not for an identical duplicate).

    With ``scp.workers`` > 1, ``workers - 1`` more listener processes bind the same port
    (SO_REUSEPORT; the kernel spreads connections across them) so associations use more than
    one core. They share the spool and the state DB (SQLite WAL serialises their commits) and
    use the default disk probe; ``on_stored`` fires only for instances this process received,
    so a scheduler must not rely on it alone (it is a wake-up hint, the state DB is the truth).
    """
    scp = settings.scp
    if not scp.allowed_calling_aets:
        logger.warning("scp.allowed_calling_aets is empty: any calling AE title is accepted")
    listener = _start_one(settings, db, free_space, on_stored)
    if scp.workers > 1:
        worker_settings = settings.model_copy(
            update={"scp": scp.model_copy(update={"port": listener.port})}
        )
        try:
            _start_workers(listener, worker_settings, scp.workers - 1)
        except BaseException:
            listener.stop()
            raise
    return listener


def _start_workers(listener: Listener, settings: AgentSettings, count: int) -> None:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads
    listener._stop_workers = ctx.Event()
    for number in range(1, count + 1):
        ready = ctx.Event()
        proc = ctx.Process(
            target=_worker_main,
            args=(settings, ready, listener._stop_workers),
            name=f"dicom-listener-{number}",
            daemon=True,
        )
        proc.start()
        listener.workers.append(proc)
        deadline = time.monotonic() + _WORKER_START_SECONDS
        while not ready.wait(0.1):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise AgentError(f"listener worker {number} failed to start")
    logger.info("%d listener worker processes share port %d", count, listener.port)


def _worker_main(settings: AgentSettings, ready: EventType, stop: EventType) -> None:
    """Body of a listener worker process: serve until the parent sets ``stop``."""
    # Ctrl-C reaches the whole process group; the parent owns shutdown and sets ``stop``.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A spawned process starts bare: same log format and the same salted study references
    # as the parent, so its lines can be read and matched with the parent's.
    observe.setup_logging(settings.logging)
    observe.load_salt(settings.paths.state.parent)
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
    )
    store_context = _StoreContext(spool, scp.max_instance_bytes, on_stored)

    ae = AE(ae_title=scp.ae_title)
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

    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store_context]),
        *_NOTIFICATION_HANDLERS,
    ]
    server_class = _ReusePortServer if scp.workers > 1 else _Server
    server = ae.make_server(
        (scp.host, scp.port),
        ssl_context=ssl_context,
        evt_handlers=handlers,
        server_class=server_class,
        request_handler=_RequestHandler,
    )
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
