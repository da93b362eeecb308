"""Reactor loops of an accepted association that wait for work instead of polling.

pynetdicom runs two threads per association, and both poll: the DUL thread sleeps a
millisecond after every loop that found nothing to do, the acceptor thread sleeps a
millisecond on every loop. On the 2-core test machine each idle association cost the listener
about 4.5 % of a core (16 idle associations: 78 %), and under load those 2,000 wake-ups a
second per association take the GIL from the threads doing the work and add up to a
millisecond at each hand-over between the two threads (docs/benchmarks.md, "Ingest"). Here:

* the DUL thread waits in ``poll(2)`` for its socket, for a self-pipe written whenever another
  thread queues a primitive to send or an event, or for :data:`TICK_SECONDS` (the ARTIM timer
  is checked on each loop);
* the acceptor thread waits on an :class:`threading.Event` set when a DIMSE message is
  complete, a primitive reaches the user queue, the DUL thread ends or the association is
  killed, or for :data:`TICK_SECONDS` (the network timeout is checked on each loop).

Both loops are pynetdicom 3.0.4's with only the sleep replaced (and are marked so below);
tests/dicom_agent/test_transport.py fingerprints the originals, so an upgrade that changes them
fails loudly. :func:`install` turns a freshly created acceptor association into one of these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.05
"""Longest wait of either loop with nothing happening: the resolution of the ARTIM timer
(``acse_timeout``) and of the network timeout."""


class Wakeup:
    """A self-pipe: :meth:`set`, from any thread, ends the owner's current or next
    :meth:`wait`. The owner thread alone waits and finally :meth:`close` s it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()  # no write to a descriptor number closed and reused
        self._closed = False

    def set(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(self._write, b"\0")

    def wait(self, fd: int, timeout: float) -> None:
        """Until ``fd`` is readable, :meth:`set` was called, or ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        poller.register(fd, select.POLLIN)
        if any(ready == self._read for ready, _ in poller.poll(timeout * 1000)):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


class _WakingQueue(queue.Queue):
    """A queue whose every put also calls :attr:`wakes` (installed by re-classing)."""

    wakes: tuple[Callable[[], None], ...]

    def _put(self, item: Any) -> None:
        super()._put(item)
        for wake in self.wakes:
            wake()


def _waking(q: queue.Queue[Any], *wakes: Callable[[], None]) -> None:
    q.__class__ = _WakingQueue
    cast(_WakingQueue, q).wakes = wakes


class _WakingFlag:
    """A boolean instance attribute (kept where pynetdicom's ``__init__`` put it) whose being
    set true also wakes the waiting loop through the instance's ``wake`` attribute (anything
    with ``set()``): the loop then ends at once instead of at its next tick."""

    def __init__(self, wake: str) -> None:
        self._wake = wake
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return bool(obj.__dict__.get(self._name, False))

    def __set__(self, obj: Any, value: bool) -> None:
        obj.__dict__[self._name] = value
        wake = obj.__dict__.get(self._wake)
        if value and wake is not None:
            wake.set()


class WaitingDUL(DULServiceProvider):
    """pynetdicom's DUL with :meth:`run_reactor` waiting in ``poll(2)`` between events."""

    _wakeup: Wakeup
    # pynetdicom sets it from other threads (stop_dul, kill_dul), then waits for this one.
    _kill_thread = _WakingFlag("_wakeup")

    def _wait_for_work(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:  # closed: nothing to wait on until the association ends it
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: poll would not see them
        self._wakeup.wait(fd, TICK_SECONDS)

    def run(self) -> None:
        # pynetdicom made the original run_reactor the thread's target in __init__, before
        # the re-class; Thread.run is looked up on the class when the thread starts.
        make_target(self.run_reactor)()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``; the one change is marked."""
        try:
            self._run_reactor()
        finally:
            self._wakeup.close()
            assoc = self.assoc
            if isinstance(assoc, WaitingAssociation):
                assoc._wake.set()  # the acceptor checks dul.is_alive() next

    def _run_reactor(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work()  # changed: was time.sleep(self._run_loop_delay)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                logger.error("Exception in DUL.run(), aborting association")
                logger.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False


class WaitingAssociation(Association):
    """pynetdicom's acceptor with :meth:`_run_reactor` waiting on :attr:`_wake`."""

    _wake: threading.Event
    # Set by kill() (from this thread or the server's) and by the DUL thread on a failure.
    _kill = _WakingFlag("_wake")

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor``; the one change is marked."""
        self._is_paused = False
        while not self._kill:
            # changed: was time.sleep(0.001)
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                logger.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                logger.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def install(assoc: Association) -> None:
    """Make a just-created acceptor association (threads not started) wait for work."""
    assoc.__class__ = WaitingAssociation
    waiting = cast(WaitingAssociation, assoc)
    waiting._wake = threading.Event()
    dul = cast(WaitingDUL, assoc.dul)
    if not isinstance(dul, WaitingDUL):
        raise TypeError("the association's DUL must be a WaitingDUL (re-class it first)")
    dul._wakeup = Wakeup()
    # The DUL thread acts on primitives to send and on events; the acceptor on what the DUL
    # hands up and on complete DIMSE messages.
    _waking(dul.to_provider_queue, dul._wakeup.set)
    _waking(dul.event_queue, dul._wakeup.set)
    _waking(dul.to_user_queue, waiting._wake.set)
    _waking(assoc.dimse.msg_queue, waiting._wake.set)
