"""The running agent (``cxr-agent serve``): listener, scheduler, worker and health, together.

Start-up order makes a second ``serve`` harmless and a restart lose nothing. First the
configured profile names are checked (a typo fails at once, with the known names), then an
exclusive lock on the state folder is taken (``agent.lock``: a second agent on the same folders
stops here, before it touches any state) and every port is bound (DICOM and health: a taken port
fails here, naming the setting to change, before any state work or model loading). Only then is
the spool reconciled with the state DB (files stored but not recorded by a crash get their rows),
jobs left ``running`` go back to ``queued``, and the listener, the scheduler, the worker and the
health endpoint start serving. SIGTERM and SIGINT stop them in the reverse order; the worker
finishes the batch in hand.

While running, the agent writes ``agent-status.json`` beside the state database every couple
of seconds (atomically) for ``cxr-agent status``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.profiles import load_profiles
from dicom_agent import spool
from dicom_agent.config import AgentSettings
from dicom_agent.errors import ConfigError
from dicom_agent.files import remove_stale_temps
from dicom_agent.finals import Monitor
from dicom_agent.inbox import DraftReader
from dicom_agent.observe import (
    Event,
    Metrics,
    event,
    load_salt,
    study_ref,
    write_heartbeat,
)
from dicom_agent.ports import bind_tcp
from dicom_agent.registry import AuditorFactory, Models, default_auditor_factory
from dicom_agent.scheduler import Scheduler
from dicom_agent.scp import Listener, start_listener
from dicom_agent.state import QUEUE_TABLES, DraftState, JobState, StateDB, StudyState
from dicom_agent.web import WebServer, create_app
from dicom_agent.worker import Worker

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "agent-status.json"
HEARTBEAT_SECONDS = 2.0


#: The lock file in the state folder that one serving agent holds (flock, exclusive).
LOCK_FILE = "agent.lock"


def heartbeat_path(settings: AgentSettings) -> Path:
    return settings.paths.state.parent / HEARTBEAT_FILE


def check_profile_names(settings: AgentSettings) -> None:
    """Fail at start-up on a profile name that no profile file defines (a typo such as ``fak``).

    Raises:
        ConfigError: naming the setting, the unknown name and every known profile name.
    """
    try:
        known = load_profiles(settings.paths.profiles)
    except CxrAuditError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    wanted = {"grounding.profile": settings.grounding.profile}
    if settings.grounding.xa_profile:
        wanted["grounding.xa_profile"] = settings.grounding.xa_profile
    if settings.drafts.parser != "rules":  # the rule-based parser is built in, not a profile
        wanted["drafts.parser"] = settings.drafts.parser
    for key, name in wanted.items():
        if name not in known:
            raise ConfigError(
                f"{key}: unknown profile {name!r}; known profiles: {', '.join(sorted(known))}"
                " (config/profiles and paths.profiles)"
            )


def _port_taken(key: str, env: str, host: str, port: int, exc: OSError) -> str:
    why = "already in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
    return (
        f"{key}: cannot listen on {host}:{port}: {why}; choose another port with {key} in the"
        f" config file or {env}=<port>"
    )


class StateLock:
    """An exclusive ``flock`` on the state folder's lock file, held while the agent runs.

    The kernel drops the lock when the process dies (even by SIGKILL), so a crash never leaves
    a stale lock behind. The file holds the holder's PID, for the error message of the next one.

    Raises:
        ConfigError: another process holds the lock (its PID and the lock path are named).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"paths.state: another cxr-agent (pid {holder}) holds the lock {path}: stop it,"
                " or give this agent its own folders (paths.state, paths.spool, paths.out)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class Agent:
    """One agent process. ``auditor_factory`` replaces model loading (tests)."""

    def __init__(
        self, settings: AgentSettings, *, auditor_factory: AuditorFactory | None = None
    ) -> None:
        self.settings = settings
        if auditor_factory is None:
            check_profile_names(settings)
        settings.ensure_folders()
        self._lock = StateLock(settings.paths.state.parent / LOCK_FILE)
        self._dicom_claim: socket.socket | None = None
        self.health: WebServer | None = None
        try:
            self._bind_ports()
        except BaseException:
            self._lock.release()
            raise
        load_salt(settings.paths.state.parent)
        self.db = StateDB(settings.paths.state)
        self.metrics = Metrics()
        self.models = Models(
            auditor_factory or default_auditor_factory(settings),
            settings.worker.model_retry_seconds,
            self.metrics,
        )
        self.drafts = DraftReader(settings, self.db, self.metrics)
        self.worker = Worker(settings, self.db, self.models, self.metrics)
        self.scheduler = Scheduler(
            settings, self.db, self.drafts, heartbeat=self.heartbeat,
            heartbeat_seconds=HEARTBEAT_SECONDS,
        )
        self.monitor = Monitor(settings, self.db, self.metrics)
        if settings.monitoring.enabled:
            self.scheduler.add_job(self.monitor.tick, settings.monitoring.poll_seconds, "finals")
        self.listener: Listener | None = None
        self.started_at: float | None = None
        self._stopped = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def _bind_ports(self) -> None:
        """Bind the health port and claim the DICOM port before any state work or model load.

        The health server binds here and serves from :meth:`start`. The DICOM port is bound
        here too, and the listener takes that very socket over in :meth:`start` (no window in
        which another program could take the port): a taken port is found now, in
        milliseconds, instead of after reconciliation and a model load.
        """
        scp, health = self.settings.scp, self.settings.health
        if scp.port:  # port 0 (tests) means "any free port": nothing can be taken
            try:
                # the listener pool's processes bind the same port (workers > 1)
                self._dicom_claim = bind_tcp(scp.host, scp.port, reuse_port=scp.workers > 1)
            except OSError as exc:
                raise ConfigError(_port_taken("scp.port", "CXR_AGENT__SCP__PORT", scp.host, scp.port, exc)) from exc
        if health.enabled:
            try:
                self.health = WebServer(health)
            except OSError as exc:
                self._release_dicom_claim()
                raise ConfigError(
                    _port_taken("health.port", "CXR_AGENT__HEALTH__PORT", health.host, health.port, exc)
                ) from exc

    def _release_dicom_claim(self) -> None:
        if self._dicom_claim is not None:
            self._dicom_claim.close()
            self._dicom_claim = None

    def start(self) -> None:
        rebuilt = spool.reconcile(
            self.db,
            self.settings.paths.spool,
            max_inflated_bytes=self.settings.scp.max_instance_bytes,
        )
        requeued = self.db.requeue_running()
        # A crash while outputs were written leaves temp files; their jobs were just
        # requeued and write everything again. A crash while a refused data set was copied
        # to the quarantine leaves one there: that data set was never kept, nothing refers to it.
        for folder in (self.settings.paths.out, self.settings.paths.quarantine):
            temps = remove_stale_temps(folder) if folder.is_dir() else 0
            if temps:
                log.info("%d temp files of a crashed run removed from %s", temps, folder)
        log.info(
            "state reconciled: %d spool rows rebuilt, %d running jobs requeued", rebuilt, requeued,
            extra=event(event=Event.STATE_RECONCILED, count=rebuilt + requeued),
        )
        scp = self.settings.scp
        bound, self._dicom_claim = self._dicom_claim, None  # the listener owns it from here
        try:
            self.listener = start_listener(
                self.settings, self.db, on_stored=self._on_stored, bound=bound
            )
        except OSError as exc:
            raise ConfigError(_port_taken("scp.port", "CXR_AGENT__SCP__PORT", scp.host, scp.port, exc)) from exc
        self.metrics.watch_listener(self.listener.server)
        self.monitor.publish()  # the monitoring gauges hold the stored window from the start
        self.scheduler.start()
        self.worker.start()
        if self.health is not None:
            self.health.start(create_app(self))
        self.started_at = time.time()
        self.heartbeat()
        log.info(
            "agent serving: DICOM port %d, health port %s, profile %s", self.listener.port,
            self.health.port if self.health else "off", self.settings.grounding.profile,
            extra=event(event=Event.AGENT_STARTED, profile=self.settings.grounding.profile),
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        log.info("agent stopping", extra=event(event=Event.AGENT_STOPPING))
        if self.listener is not None:
            self.listener.stop()
        self.scheduler.stop()
        self.worker.stop()
        self.models.close()
        if self.health is not None:
            self.health.stop()
        self._release_dicom_claim()
        self.heartbeat(stopped=True)
        self.db.close()
        self._lock.release()
        self._stopped.set()
        log.info("agent stopped", extra=event(event=Event.AGENT_STOPPED))

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT; then stop cleanly."""
        stop_requested = threading.Event()

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            self.start()
        except BaseException:
            self.stop()  # whatever started must not keep the process alive
            raise
        try:
            while not stop_requested.wait(0.5):
                pass
        finally:
            self.stop()

    # -- callbacks ----------------------------------------------------------------------------

    def _on_stored(self, study_uid: str) -> None:
        # The listener has logged the instance.stored event; here only what the agent adds.
        self.metrics.instances_stored.labels("stored").inc()
        ref = study_ref(study_uid)
        if self.db.latest_audit_job(study_uid) is not None:
            log.info(
                "late instance: study receiving again, it will be re-audited",
                extra=event(event=Event.STUDY_REOPENED, study=ref, state=StudyState.RECEIVING),
            )

    # -- status ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The health body: serving flag, component states, model state and queue counts."""
        listener_ok = self.listener is not None and not self._stopped.is_set()
        scheduler_ok = self.scheduler.running
        worker_ok = self.worker.alive
        models = self.models.status()
        profile = self.settings.grounding.profile
        model = models.get(profile, {"profile": profile, "state": "not_loaded"})
        body: dict[str, Any] = {
            "serving": listener_ok and scheduler_ok and worker_ok,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "listener": {
                "running": listener_ok,
                "port": self.listener.port if self.listener else None,
                "ae_title": self.settings.scp.ae_title,
            },
            "scheduler": {"running": scheduler_ok},
            "worker": {"running": worker_ok},
            "model": model,
            "models": models,
            "health_port": self.health.port if self.health else None,
        }
        if model.get("state") != "ready":
            body["message"] = (
                f"model for profile {profile} is {model.get('state')}: studies are received,"
                " paired and queued; audits wait until it loads"
            )
        body.update(status_counts(self.db))
        return body

    def heartbeat(self, stopped: bool = False) -> None:
        body = self.snapshot() if not stopped else {"serving": False, "pid": os.getpid()}
        body["stopped"] = stopped
        write_heartbeat(heartbeat_path(self.settings), body)


#: Dead and retrying jobs listed by ``status`` and ``/healthz``: the newest ones only, so a
#: health probe never reads every job while it holds the state DB lock (issue 14 item 9).
STATUS_JOBS_SHOWN = 100


def status_counts(db: StateDB) -> dict[str, Any]:
    """Queue depths, waiting studies, orphans, and the newest dead and retrying jobs (with their
    errors; at most :data:`STATUS_JOBS_SHOWN` each) from the DB."""
    counts = db.counts(QUEUE_TABLES)
    dead = [
        {
            "job_id": j.id,
            "kind": j.kind,
            "study": study_ref(j.study_instance_uid),
            "attempts": j.attempts,
            "error": (j.last_error or "").splitlines()[0][:300] if j.last_error else None,
        }
        for j in db.recent_jobs(JobState.DEAD, STATUS_JOBS_SHOWN)
    ]
    retrying = [
        {"job_id": j.id, "kind": j.kind, "study": study_ref(j.study_instance_uid), "attempts": j.attempts,
         "next_attempt_at": j.next_attempt_at, "error": (j.last_error or "").splitlines()[0][:300]}
        for j in db.recent_jobs(JobState.QUEUED, STATUS_JOBS_SHOWN, errored=True)
    ]
    return {
        "jobs": {s.value: counts["jobs"].get(s.value, 0) for s in JobState},
        "studies": {s.value: counts["studies"].get(s.value, 0) for s in StudyState},
        "drafts": {s.value: counts["drafts"].get(s.value, 0) for s in DraftState},
        "waiting_for_draft": counts["studies"].get(StudyState.WAITING_DRAFT.value, 0),
        "orphan_drafts": counts["drafts"].get(DraftState.ORPHAN.value, 0),
        "dead_jobs": dead,
        "retrying_jobs": retrying,
    }
