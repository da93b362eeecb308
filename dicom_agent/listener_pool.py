"""Extra listener processes for ``scp.workers`` > 1: one port, several cores.

Each worker is a spawned process (never a fork of a process that holds threads) that binds the
same port with SO_REUSEPORT, so the kernel spreads connections across the processes. Workers
share the spool and the state DB with the parent (SQLite WAL serialises their commits). The
parent owns shutdown: it sets one event and every worker stops its listener and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from dicom_agent import observe
from dicom_agent.config import AgentSettings
from dicom_agent.errors import AgentError

logger = logging.getLogger(__name__)

_WORKER_START_SECONDS = 60.0
_WORKER_STOP_SECONDS = 10.0

#: ``serve(settings, ready, stop)`` runs one listener in the worker, sets ``ready`` once it
#: listens and serves until ``stop`` is set; it must be a module-level function (it is pickled
#: by name into the spawned process).
Serve = Callable[[AgentSettings, EventType, EventType], None]


@dataclass
class WorkerPool:
    """The running worker processes; :meth:`stop` ends them."""

    stop_event: EventType
    processes: list[BaseProcess] = field(default_factory=list)

    def stop(self) -> None:
        """Ask every worker to stop, wait for it, terminate one that does not."""
        self.stop_event.set()
        for proc in self.processes:
            proc.join(timeout=_WORKER_STOP_SECONDS)
            if proc.is_alive():
                logger.warning("listener worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join()


def start_workers(settings: AgentSettings, count: int, serve: Serve) -> WorkerPool:
    """Start ``count`` worker processes running ``serve``; return once each is listening.

    Raises :class:`AgentError` (after stopping the ones started) when one does not come up
    within a minute.
    """
    ctx = multiprocessing.get_context("spawn")
    pool = WorkerPool(stop_event=ctx.Event())
    try:
        for number in range(1, count + 1):
            ready = ctx.Event()
            proc = ctx.Process(
                target=_worker_main,
                args=(serve, settings, ready, pool.stop_event),
                name=f"dicom-listener-{number}",
                daemon=True,
            )
            proc.start()
            pool.processes.append(proc)
            deadline = time.monotonic() + _WORKER_START_SECONDS
            while not ready.wait(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise AgentError(f"listener worker {number} failed to start")
    except BaseException:
        pool.stop()
        raise
    logger.info("%d listener worker processes share port %d", count, settings.scp.port)
    return pool


def _worker_main(serve: Serve, settings: AgentSettings, ready: EventType, stop: EventType) -> None:
    """Body of a worker process: set up like the parent, then ``serve`` until ``stop``."""
    # Ctrl-C reaches the whole process group; the parent owns shutdown and sets ``stop``.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A spawned process starts bare: same log format and the same salted study references
    # as the parent, so its lines can be read and matched with the parent's.
    observe.setup_logging(settings.logging)
    observe.load_salt(settings.paths.state.parent)
    serve(settings, ready, stop)
