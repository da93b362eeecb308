"""The listener's transport: bounded, timed PDU reads and C-STORE data sets streamed to the spool.

pynetdicom (pinned in pyproject.toml; tests/dicom_agent/test_transport.py fails loudly if the
private hooks below change) reads each PDU whole into memory, allocating whatever length the
peer announces before any AE title is checked, and gives accepted sockets no timeout. Here,
per accepted connection (PS3.8 9.3 for the PDU layout):

* every PDU length is checked before anything is allocated: A-ASSOCIATE PDUs up to
  :data:`ASSOCIATE_PDU_MAX`, release and abort PDUs up to :data:`CONTROL_PDU_MAX`, P-DATA-TF up
  to the ``scp.max_pdu_bytes`` we announced. A longer one ends the connection at once;
* a PDU (and the TLS handshake, done on the first read) must arrive whole within
  ``scp.read_timeout_seconds`` of its first byte, so a peer that stalls mid-PDU, or mid
  ClientHello, is dropped instead of holding its thread and slot;
* a peer that connects and closes before its A-ASSOCIATE-RQ frees its thread at once (pynetdicom
  would keep it waiting ``acse_timeout``), and only associations that sent an A-ASSOCIATE-RQ
  count against ``scp.max_associations``; connections still silent are capped separately;
* each C-STORE data set is written to a spool file fragment by fragment as P-DATA-TF PDUs
  arrive (:class:`~dicom_agent.incoming.IncomingFile`), and past ``scp.max_instance_bytes`` the
  association is aborted (A-ABORT, PS3.8 7.3.1) instead of reading on. Memory per association
  is a few PDUs, plus at most :data:`~dicom_agent.incoming.QUEUE_BYTES` waiting for the data
  set's writer thread, whatever the instance size. Middle fragments go to the file straight from the
  PDU bytes, without pynetdicom's PDU objects and queued events (about a sixth of the
  listener's CPU per 10 MB image, docs/benchmarks.md).

Both threads of an association wait for work instead of polling every millisecond
(:mod:`dicom_agent.reactor`). Everything else (TCP_NODELAY, large ``recv_into`` reads,
optional TLS per PS3.15 B.1, SO_REUSEPORT when several listener processes share a port) is as
before the split.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, ClassVar, cast

from pynetdicom import AE, _handlers, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_agent import reactor
from dicom_agent.config import SCPSettings
from dicom_agent.errors import ConfigError, InstanceTooLargeError, SpoolError
from dicom_agent.incoming import IncomingFile
from dicom_agent.reactor import WaitingDUL
from dicom_agent.spool import Spool

logger = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ/AC/RJ accepted. 128 presentation contexts with a dozen transfer
#: syntaxes each, plus user identity, stay well under it.
ASSOCIATE_PDU_MAX = 256 * 1024
#: A-RELEASE-RQ/RP and A-ABORT have a 4-byte body (PS3.8 9.3.6 to 9.3.8); a little slack.
CONTROL_PDU_MAX = 1024
#: P-DATA-TF bound when ``scp.max_pdu_bytes`` is 0 (which announces "no limit", PS3.8 D.1).
UNLIMITED_PDATA_MAX = 64 * 1024 * 1024
#: Connections that have not sent an A-ASSOCIATE-RQ yet, per ``scp.max_associations``.
SILENT_CONNECTIONS_PER_SLOT = 4

_PDU_HEADER = struct.Struct(">BBL")
_RECV_CHUNK = 1 << 20
_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _P_DATA_TF = 0x01, 0x02, 0x03, 0x04
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_AWAITING_ASSOCIATE_RQ = "Sta2"
_ASSOCIATED = "Sta6"
_PDV_LENGTH = struct.Struct(">L")


@dataclass(frozen=True)
class ReceiveLimits:
    """What one accepted connection may cost: PDU sizes, how long one PDU may take, and how
    many associations its peer address may hold at once."""

    max_pdata_bytes: int
    read_timeout_seconds: float
    max_silent_connections: int
    max_per_address: int

    @classmethod
    def from_settings(cls, scp: SCPSettings) -> ReceiveLimits:
        """The limits of ``scp.*`` settings (``max_pdu_bytes`` 0 means :data:`UNLIMITED_PDATA_MAX`)."""
        return cls(
            max_pdata_bytes=scp.max_pdu_bytes or UNLIMITED_PDATA_MAX,
            read_timeout_seconds=scp.read_timeout_seconds,
            max_silent_connections=scp.max_associations * SILENT_CONNECTIONS_PER_SLOT,
            max_per_address=scp.max_associations_per_address,
        )

    def pdu_max(self, pdu_type: int) -> int:
        """Longest PDU body (the PDU-length field, PS3.8 9.3.1) accepted for ``pdu_type``."""
        if pdu_type == _P_DATA_TF:
            return self.max_pdata_bytes
        if pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ):
            return ASSOCIATE_PDU_MAX
        return CONTROL_PDU_MAX


@dataclass
class Counters:
    """Event counters of one listener process (C-STORE outcomes, refusals, aborts)."""

    values: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str) -> None:
        with self._lock:
            self.values[key] = self.values.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


class _AssociationSocket(AssociationSocket):
    """Reads each PDU with a few large ``recv_into`` calls, all within one deadline.

    pynetdicom reads a whole PDU per call with 4 KiB ``recv`` calls and no timeout; at 1 MiB
    PDUs its loop costs a few thousand Python iterations per 10 MB image, and a peer that
    stops mid-PDU blocks it for ever.
    """

    limits: ReceiveLimits

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        deadline = time.monotonic() + self.limits.read_timeout_seconds
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("PDU not received within scp.read_timeout_seconds")
            sock.settimeout(remaining)
            # The first read of a TLS socket also runs the handshake, under the same deadline.
            n = sock.recv_into(view[got:], min(nr_bytes - got, _RECV_CHUNK))
            if not n:
                # Connection closed: hand back the short read, as pynetdicom does.
                del view
                del buf[got:]
                return buf
            got += n
        # Sends (a C-STORE response, an A-ABORT) get the full timeout, not what was left here.
        sock.settimeout(self.limits.read_timeout_seconds)
        return buf

    def _shutdown_socket(self) -> None:
        # pynetdicom skips close() when shutdown() fails, as it does on a reset connection,
        # leaving the descriptor open until garbage collection.
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class _BoundedDUL(WaitingDUL):
    """pynetdicom's DUL with the PDU length checked before the PDU body is read (and its
    reactor waiting for work, :mod:`dicom_agent.reactor`)."""

    limits: ReceiveLimits

    def _read_pdu_data(self) -> None:
        """Read PDUs while data set fragments arrive back to back, then return.

        A PDU taken by :meth:`_StreamingDIMSE.take_fragments` queues no event, and pynetdicom's
        reactor sleeps a millisecond after a loop without one: reading on while the socket has
        data keeps a streamed data set from paying that per PDU. Anything to send, or any
        other PDU, ends the loop.
        """
        sock = cast(_AssociationSocket, self.socket)
        while (
            self._read_one(sock)
            and self.event_queue.empty()
            and not self.to_provider_queue.queue
            and sock.ready
        ):
            pass

    def _read_one(self, sock: _AssociationSocket) -> bool:
        """Read one PDU (PS3.8 9.3.1: type, reserved, 4-byte length) and queue its event;
        True when it was a streamed data set fragment (no event queued).

        Same events as pynetdicom's (Evt3/4/6/10/12/13/16 on a good PDU, Evt17 when the
        connection closes or times out, Evt19 on an unknown or undecodable PDU), plus: a
        length above :meth:`ReceiveLimits.pdu_max` queues Evt19 (A-ABORT) after the
        association, or closes the connection before it, without reading the body.
        """
        try:
            header = sock.recv(6)
            if len(header) < 6:
                self._closed()
                return False
            pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
            if pdu_type not in _KNOWN_PDU_TYPES:
                logger.warning("unknown PDU type 0x%02X from %s: aborting", pdu_type, _peer(self))
                self._invalid()
                return False
            limit = self.limits.pdu_max(pdu_type)
            if pdu_length > limit:
                logger.warning(
                    "PDU type 0x%02X from %s announces %d bytes, above the %d accepted: "
                    "connection closed without reading it",
                    pdu_type, _peer(self), pdu_length, limit,
                )
                self._refuse_rest(sock)
                cast(ListenerServer, self.assoc._server).counters.count("pdu_too_long")
                return False
            body = sock.recv(pdu_length)
        except OSError as exc:  # reset, timeout, TLS failure
            logger.info("connection from %s ended mid-PDU: %s", _peer(self), type(exc).__name__)
            self._closed()
            return False
        if len(body) != pdu_length:
            self._closed()
            return False
        if (
            pdu_type == _P_DATA_TF
            and self.state_machine.current_state == _ASSOCIATED
            and cast(_StreamingDIMSE, self.assoc.dimse).take_fragments(body)
        ):
            # The whole PDU as one buffer is a copy of every byte received: built only for a
            # handler that asks for it (the listener binds none).
            if self.assoc.get_handlers(evt.EVT_DATA_RECV):
                evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": header + body})
            return True  # written to the spool file; no PDU object, no event, no queue
        data = header + body
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:  # pynetdicom raises many types on malformed PDUs
            logger.warning("undecodable PDU from %s (%s): aborting", _peer(self), type(exc).__name__)
            self._invalid()
            return False
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return False

    def _closed(self) -> None:
        """Evt17 (transport closed)."""
        self._end("Evt17")

    def _invalid(self) -> None:
        """Evt19 (invalid PDU: A-ABORT, PS3.8 9.2.3 AA-1/AA-8)."""
        self._end("Evt19")

    def _end(self, event: str) -> None:
        # Before an A-ASSOCIATE-RQ also wake the acceptor thread, which would otherwise wait
        # ``acse_timeout`` for a request that cannot come, holding a thread and a slot.
        before_request = self.state_machine.current_state == _AWAITING_ASSOCIATE_RQ
        self.event_queue.put(event)
        if before_request:
            self.to_user_queue.put(None)  # type: ignore[arg-type]  # run_reactor: "timed out"

    def _refuse_rest(self, sock: _AssociationSocket) -> None:
        # Nothing more is read from this peer: its next bytes would be the body we refused.
        raw = sock.socket
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RD)
        if self.state_machine.current_state == _AWAITING_ASSOCIATE_RQ:
            self._closed()
        else:
            self._invalid()


class _StreamingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with each C-STORE data set streamed to a spool file.

    Once a C-STORE-RQ command set is decoded, the message's ``_data_set_file`` (the hook of
    pynetdicom's own chunked receive, which would write to the system temp folder, unbounded)
    becomes an :class:`~dicom_agent.incoming.IncomingFile`; each later data set fragment is
    written to it as its P-DATA-TF arrives. The C-STORE handler finds it as
    ``request._dataset_file``.
    """

    spool: Spool

    def receive_primitive(self, primitive: P_DATA) -> None:
        try:
            super().receive_primitive(primitive)
            message = self.message
            if (
                isinstance(message, C_STORE_RQ)
                and message._data_set_file is None
                and message.context_id is not None
            ):
                self._stream(message)
        except InstanceTooLargeError as exc:
            self._too_large(exc)

    def take_fragments(self, body: bytearray) -> bool:
        """Write a P-DATA-TF's data set fragments straight to the spool file; False (nothing
        done) unless every PDV is a middle fragment of the data set being streamed.

        This is DT-2 (PS3.8 9.2.3: P-DATA indication) for the common case, without pynetdicom
        building a PDU, a primitive and a queued event per PDU: they cost about as much CPU as
        the rest of a C-STORE together. PDV items (PS3.8 9.3.5.1): 4-byte length, presentation
        context ID, message control header (bit 0: command, bit 1: last fragment), data.
        """
        message = self.message
        if not isinstance(message, C_STORE_RQ) or not isinstance(
            message._data_set_file, IncomingFile
        ):
            return False
        view = memoryview(body)
        fragments: list[memoryview] = []
        pos = 0
        while pos < len(view):
            if pos + 6 > len(view):
                return False
            (length,) = _PDV_LENGTH.unpack_from(view, pos)
            end = pos + 4 + length
            if length < 2 or end > len(view):
                return False
            if view[pos + 4] != message.context_id or view[pos + 5] & 0b11:
                return False  # another context, a command, or the last fragment: full path
            fragments.append(view[pos + 6 : end])
            pos = end
        try:
            for fragment in fragments:
                message._data_set_file.write(fragment)
        except InstanceTooLargeError as exc:
            self._too_large(exc)
        return True

    def _too_large(self, exc: InstanceTooLargeError) -> None:
        logger.warning("C-STORE from %s: %s; association aborted", _peer(self), exc)
        cast(ListenerServer, self.assoc._server).counters.count("too_large")
        self._abandon()
        self.dul.event_queue.put("Evt19")  # A-ABORT (PS3.8 7.3.1), then close

    def _stream(self, message: C_STORE_RQ) -> None:
        command = message.command_set
        context = self.assoc._accepted_cx.get(cast(int, message.context_id))
        if context is None:  # PS3.8 9.3.5: a PDV on a context we did not accept
            logger.warning("C-STORE from %s on an unaccepted presentation context", _peer(self))
            self._abandon()
            self.dul.event_queue.put("Evt19")
            return
        try:
            incoming = self.spool.open_incoming(
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                str(context.transfer_syntax[0]),
                self.assoc.requestor.ae_title,
            )
            sink: IncomingFile | RefusedDataSet = incoming
        except SpoolError as exc:
            logger.warning("C-STORE from %s: cannot open a spool file: %s", _peer(self), exc)
            sink = RefusedDataSet(exc)
        data = message.data_set
        # Fragments that came in the same P-DATA-TF as the command's last one (one PDU).
        early = data.getvalue() if data is not None else b""
        message.data_set = BytesIO()  # pynetdicom requires one; it stays empty
        message._data_set_file = sink  # type: ignore[assignment]
        if early:
            sink.write(early)

    def _abandon(self) -> None:
        """Drop a data set half received (abort, oversize): its spool file goes now."""
        message = self.message
        self.message = None
        if message is not None and isinstance(message._data_set_file, IncomingFile):
            message._data_set_file.discard()


class RefusedDataSet:
    """Stands in for the spool file of a data set that cannot be written (none could be
    opened); the C-STORE handler answers :attr:`error`."""

    def __init__(self, error: SpoolError) -> None:
        self.error = error
        self.name = ""

    @property
    def file(self) -> RefusedDataSet:
        return self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        """Nothing written, nothing to flush."""

    def close(self) -> None:
        """Nothing open."""


def _peer(provider: DULServiceProvider | DIMSEServiceProvider) -> str:
    info = provider.assoc.requestor
    return f"{info.ae_title or '?'}@{info.address}:{info.port}"


def _discard_partial(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: a data set still arriving when the connection ends is removed."""
    dimse = event.assoc.dimse
    if isinstance(dimse, _StreamingDIMSE):
        dimse._abandon()


# pynetdicom's standard loggers run on every PDU and DIMSE message even with DEBUG off; the
# C-STORE one compares the whole received data set with b"" just to print "Present".
_STANDARD_LOGGERS = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)


class ListenerRequestHandler(RequestHandler):
    server: ListenerServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        for event, handler in _STANDARD_LOGGERS:
            assoc.unbind(event, handler)
        assoc.bind(evt.EVT_CONN_CLOSE, _discard_partial)
        # Re-class rather than re-create: constructing a second socket would queue a second
        # transport-connection event (Evt5) into the state machine. The subclasses add no
        # state beyond the limits and the spool set here.
        limits = self.server.limits
        sock = cast(_AssociationSocket, assoc.dul.socket)
        sock.__class__ = _AssociationSocket
        sock.limits = limits
        assoc.dul.__class__ = _BoundedDUL
        cast(_BoundedDUL, assoc.dul).limits = limits
        assoc.dimse.__class__ = _StreamingDIMSE
        cast(_StreamingDIMSE, assoc.dimse).spool = self.server.spool
        assoc.acse.__class__ = _AddressLimitedACSE
        reactor.install(assoc)
        return assoc


class _AddressLimitedACSE(ACSE):
    """pynetdicom's ACSE with ``scp.max_associations_per_address`` checked before the rest of
    the acceptor's negotiation, so that one host (a modality trickling data within every
    timeout, or a hostile peer with an accepted AE title) cannot hold every association slot."""

    def _negotiate_as_acceptor(self) -> None:
        assoc = self.assoc
        server = cast(ListenerServer, assoc._server)
        address = assoc.requestor.address
        # Associations that sent an A-ASSOCIATE-RQ (ListenerAE), this one included.
        held = sum(1 for a in assoc.ae.active_associations if a.requestor.address == address)
        if held <= server.limits.max_per_address:
            super()._negotiate_as_acceptor()
            return
        logger.warning(
            "association from %s rejected: %d already open from that address "
            "(scp.max_associations_per_address=%d)",
            address, held - 1, server.limits.max_per_address,
        )
        server.counters.count("per_address_limit")
        # Rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8
        # 9.3.4), as pynetdicom answers past maximum_associations.
        self.send_reject(0x02, 0x03, 0x02)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


class ListenerAE(AE):
    """An AE whose association limit counts only associations that sent an A-ASSOCIATE-RQ.

    pynetdicom counts every accepted connection against ``maximum_associations`` (PS3.8
    local-limit-exceeded), so a few silent connections locked every modality out; those are
    capped by :meth:`ListenerServer.verify_request` instead.
    """

    @property
    def active_associations(self) -> list[Association]:
        return [a for a in super().active_associations if a.requestor.primitive is not None]


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with our socket options, limits and spool."""

    reuse_port = False
    request_queue_size = 128  # a burst of connects must not overflow the backlog (SYN drops)
    daemon_threads = True
    #: A socket already bound to the port (serve binds its ports before any state work); the
    #: server listens on it instead of binding a new one. See :func:`on_bound_socket`.
    prebound: ClassVar[socket.socket | None] = None
    limits: ReceiveLimits
    spool: Spool
    counters: Counters

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.prebound is not None:
            self.socket.close()
            self.socket = self.prebound
            self.server_address = self.socket.getsockname()
            return
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.limits.read_timeout_seconds)  # never a read without a timeout
        if self.ssl_context is not None:
            # The handshake happens on the association thread's first read (within
            # read_timeout_seconds), so a peer that never completes it stalls only itself.
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Close a new connection at once while too many are open without an association."""
        silent = sum(
            1 for a in self.active_associations if a.requestor.primitive is None
        )
        if silent >= self.limits.max_silent_connections:
            self.counters.count("connections_refused")
            logger.warning(
                "connection from %s closed: %d connections open without an A-ASSOCIATE-RQ",
                client_address[0], silent,
            )
            return False
        return True


class ReusePortServer(ListenerServer):
    reuse_port = True


def on_bound_socket(base: type[ListenerServer], sock: socket.socket) -> type[ListenerServer]:
    """``base`` listening on ``sock``, a socket already bound to the listener's address (and,
    for :class:`ReusePortServer`, bound with SO_REUSEPORT set). pynetdicom builds the server
    from its class alone, so the socket travels as a class attribute of a subclass."""
    return type(base.__name__, (base,), {"prebound": sock})


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
