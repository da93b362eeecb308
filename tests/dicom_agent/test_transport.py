"""Guards for the private pynetdicom hooks that dicom_agent/transport.py relies on.

transport.py replaces ``DULServiceProvider._read_pdu_data`` with a bounded copy (which also
writes middle data set fragments straight to the spool file, doing DT-2's work), re-classes
the association's socket, DUL and DIMSE provider, and hands its spool file to pynetdicom's DIMSE
message through ``_data_set_file``; reactor.py replaces both reactor loops with copies that
wait for work instead of sleeping a millisecond. None of that is public API, so pyproject.toml pins the
version and these tests fail loudly, naming what to re-read, when an upgrade changes any of it.
The behaviour itself is tested over real associations in test_scp.py and
tests/integration/test_hostile_peers.py.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import pynetdicom
import pytest
from pynetdicom import fsm
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_agent.transport import ReceiveLimits

PINNED = "3.0.4"

# The upstream code each hook depends on, with the SHA-256 (first 16 hex digits) of its source
# in the pinned version and what transport.py assumes about it.
FINGERPRINTS: list[tuple[Callable[..., Any], str, str]] = [
    (DULServiceProvider._read_pdu_data, "19f2d4e38c13c835",
     "replaced whole by _BoundedDUL._read_pdu_data: port any upstream fix"),
    (DULServiceProvider._is_transport_event, "8725ed03bb8fbdef",
     "calls _read_pdu_data only when the socket is readable"),
    (DULServiceProvider.run_reactor, "e3a10eb3a0931e48",
     "copied whole by reactor.WaitingDUL.run_reactor with its 1 ms sleep replaced by a wait: "
     "port any upstream fix; restarts the idle timer after a transport event "
     "(_read_pdu_data reads fragments back to back for that reason)"),
    (DULServiceProvider.__init__, "c82dafa9438ddf70",
     "creates event_queue, to_provider_queue and to_user_queue (reactor.install makes their "
     "puts wake the waiting threads) and binds the original run_reactor as the thread's "
     "target (WaitingDUL.run starts its own instead)"),
    (DULServiceProvider.stop_dul, "28a7e0be126e7b30",
     "sets _kill_thread, then waits for the DUL thread (WaitingDUL wakes it on that set)"),
    (DULServiceProvider.kill_dul, "5ceccf8dd01c2072", "sets _kill_thread"),
    (Association._run_reactor, "f28838c5559e462a",
     "copied whole by reactor.WaitingAssociation._run_reactor with its 1 ms sleep replaced by "
     "a wait: port any upstream fix"),
    (Association.kill, "8f9713666a7f4cff",
     "sets _kill (WaitingAssociation wakes its reactor on that set), then stops the DUL"),
    (fsm.DT_2, "9ec543394e0b49eb",
     "P-DATA-TF in Sta6 only hands the primitive to dimse.receive_primitive (take_fragments "
     "does the same for middle data set fragments without the PDU objects)"),
    (DIMSEServiceProvider.receive_primitive, "5f99c86b14a15cef",
     "keeps the message in progress in self.message; resets it when complete"),
    (DIMSEMessage.decode_msg, "f51c777e841a76be",
     "writes data set fragments to _data_set_file.write() and calls .file.flush()"),
    (DIMSEMessage.message_to_primitive, "f8f43d34e43450ef",
     "copies _data_set_file to the C-STORE primitive's _dataset_file"),
    (AssociationSocket.recv, "6bc20a33b1b7cfe7", "recv(n) returns a short read on EOF"),
    (AssociationSocket._shutdown_socket, "e2b2628faa81a578",
     "overridden: upstream skips close() when shutdown() fails"),
    (Association.run_reactor, "ed8bbbe3b3d6ddae",
     "an acceptor given None by receive_pdu() ends at once (used to free a slot)"),
    (StorageServiceClass.SCP, "63afca7fc6c6e7ee",
     "after the C-STORE handler: _dataset_file.close() and os.unlink(_dataset_file.name)"),
    (RequestHandler._create_association, "05c8d12b79863cdb",
     "creates socket, DUL and DIMSE provider that ListenerRequestHandler re-classes"),
    (ACSE._negotiate_as_acceptor, "fffd360957c42a8e",
     "an acceptor rejects with send_reject(), EVT_REJECTED and assoc.kill() "
     "(_AddressLimitedACSE rejects past the per-address limit the same way, then delegates)"),
    (ACSE.negotiate_association, "a6f771214fa494c1",
     "counts ae.active_associations against maximum_associations (ListenerAE filters it)"),
]


def test_pynetdicom_is_the_pinned_version() -> None:
    assert pynetdicom.__version__ == PINNED, (
        f"pynetdicom {pynetdicom.__version__} installed, transport.py was written against "
        f"{PINNED}: re-read the hooks listed in {__name__}.FINGERPRINTS, then update PINNED, "
        "the fingerprints and the pin in pyproject.toml"
    )


@pytest.mark.parametrize(
    ("function", "digest", "assumption"),
    FINGERPRINTS,
    ids=[f.__qualname__ for f, _, _ in FINGERPRINTS],
)
def test_private_hook_is_unchanged(
    function: Callable[..., Any], digest: str, assumption: str
) -> None:
    source = inspect.getsource(function)
    found = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert found == digest, (
        f"pynetdicom changed {function.__qualname__}; dicom_agent/transport.py assumes: "
        f"{assumption}. Re-check it, then record the new fingerprint {found}."
    )


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (DULServiceProvider, "_decode_pdu"),
        (DULServiceProvider, "event_queue"),
        (DULServiceProvider, "to_user_queue"),
        (DULServiceProvider, "_recv_pdu"),
        (DULServiceProvider, "state_machine"),
        (DIMSEMessage, "_data_set_file"),
        (Association, "_accepted_cx"),
        (Association, "_server"),
    ],
)
def test_private_attributes_still_exist(owner: type, name: str) -> None:
    """Attributes set in ``__init__`` are looked up on a fresh instance's source."""
    init = inspect.getsource(owner.__init__)  # type: ignore[misc]
    assert hasattr(owner, name) or f"self.{name}" in init, (
        f"{owner.__name__}.{name} is gone: dicom_agent/transport.py uses it"
    )


def test_pdu_limits_by_type() -> None:
    limits = ReceiveLimits(max_pdata_bytes=16384, read_timeout_seconds=1.0,
                           max_silent_connections=4, max_per_address=2)
    assert limits.pdu_max(0x04) == 16384  # P-DATA-TF: what we announced
    assert limits.pdu_max(0x01) < 1 << 20  # A-ASSOCIATE-RQ: bounded before the AE check
    assert limits.pdu_max(0x07) < 4096  # A-ABORT has a 4-byte body
