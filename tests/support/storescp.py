"""An in-process Storage SCP on loopback for tests: keeps what it receives and was proposed."""

from __future__ import annotations

import ssl
import threading

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer


class Receiver:
    """A Storage SCP on loopback that keeps what it receives and what was proposed to it."""

    def __init__(self, port: int, status: int = 0x0000, require_called_aet: bool = False) -> None:
        self.port = port
        self.status = status  # the C-STORE status answered (PS3.4 B.2.3)
        self.received: list[Dataset] = []
        self.proposed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        ae = AE(ae_title="RESEARCHPACS")
        ae.require_called_aet = require_called_aet  # another called AE title: rejected-permanent
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._ae = ae
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return self.status

    def _on_requested(self, event: evt.Event) -> None:
        with self._lock:
            for cx in event.assoc.requestor.requested_contexts:
                for syntax in cx.transfer_syntax:
                    self.proposed.add((str(cx.abstract_syntax), str(syntax)))

    def start(self, ssl_context: ssl.SSLContext | None = None) -> Receiver:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
