"""Tests for dicom_agent.reactor: association threads that wait for work instead of polling.

Release, abort, stalled peers and the network timeout over these loops are exercised by
test_scp.py and tests/integration/test_hostile_peers.py; here, the waiting itself.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_agent import conformance as dc
from dicom_agent.config import load_settings
from dicom_agent.reactor import TICK_SECONDS, WaitingAssociation, WaitingDUL, Wakeup
from dicom_agent.scp import Listener, start_listener
from dicom_agent.state import StateDB
from tests.conftest import free_port, var_paths


def test_wakeup_set_before_wait_ends_it_at_once() -> None:
    wakeup = Wakeup()
    a, b = socket.socketpair()
    try:
        wakeup.set()
        wakeup.set()  # several wake-ups before a wait are one
        start = time.monotonic()
        wakeup.wait(a.fileno(), 30)
        assert time.monotonic() - start < 15
        start = time.monotonic()
        wakeup.wait(a.fileno(), 0.2)  # drained: this one runs to its timeout
        assert time.monotonic() - start >= 0.15
    finally:
        wakeup.close()
        a.close()
        b.close()
    wakeup.set()  # after close: ignored, no write to a reused descriptor number


def test_wakeup_ends_on_a_readable_descriptor_or_a_set_from_another_thread() -> None:
    wakeup = Wakeup()
    a, b = socket.socketpair()
    try:
        b.send(b"x")
        start = time.monotonic()
        wakeup.wait(a.fileno(), 30)
        assert time.monotonic() - start < 15
        a.recv(1)
        threading.Timer(0.1, wakeup.set).start()
        start = time.monotonic()
        wakeup.wait(a.fileno(), 30)
        assert time.monotonic() - start < 15
    finally:
        wakeup.close()
        a.close()
        b.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    settings = load_settings(
        paths=var_paths(tmp_path / "var"), scp={"port": free_port(), "min_free_bytes": 0}
    )
    settings.ensure_folders()
    db = StateDB(settings.paths.state)
    running = start_listener(settings, db)
    yield running
    running.stop()
    db.close()


def _echo_association(port: int) -> object:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(dc.VERIFICATION_SOP_CLASS, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRAUDIT")
    assert assoc.is_established
    return assoc


def test_an_idle_association_wakes_per_tick_not_per_millisecond(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    dul_waits: list[float] = []
    real_wait = WaitingDUL._wait_for_work

    def counting(self: WaitingDUL) -> None:
        dul_waits.append(time.monotonic())
        real_wait(self)

    monkeypatch.setattr(WaitingDUL, "_wait_for_work", counting)
    assoc = _echo_association(listener.port)
    try:
        deadline = time.monotonic() + 10
        while not listener.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        (server_side,) = listener.server.active_associations
        assert isinstance(server_side, WaitingAssociation)
        assert isinstance(server_side.dul, WaitingDUL)
        dul_waits.clear()
        time.sleep(1.0)
        # pynetdicom's loop would have slept and woken about 1,000 times in that second.
        assert 0 < len(dul_waits) <= 2 / TICK_SECONDS
        assert int(assoc.send_c_echo().Status) == dc.STATUS_SUCCESS  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_release_ends_both_threads_and_closes_the_wakeup_pipe(listener: Listener) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        assoc = _echo_association(listener.port)
        assert int(assoc.send_c_echo().Status) == dc.STATUS_SUCCESS  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while listener.server.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.server.active_associations == []
    # Each association had a pipe (two descriptors) and a socket; none is left open.
    assert len(os.listdir("/proc/self/fd")) <= before + 1
