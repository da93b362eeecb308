"""The running agent (``cxr-agent serve``): listener, scheduler, worker and health, together.

Start-up order makes a restart lose nothing: the spool is reconciled with the state DB (files
stored but not recorded by a crash get their rows), jobs left ``running`` go back to
``queued``, and only then do the listener, the scheduler, the worker and the health endpoint
start. SIGTERM and SIGINT stop them in the reverse order; the worker finishes the batch in hand.

While running, the agent writes ``agent-status.json`` beside the state database every couple
of seconds (atomically) for ``cxr-agent status``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from dicom_agent import spool
from dicom_agent.config import AgentSettings
from dicom_agent.errors import ConfigError
from dicom_agent.files import remove_stale_temps
from dicom_agent.inbox import DraftReader
from dicom_agent.observe import (
    Event,
    HealthServer,
    Metrics,
    event,
    load_salt,
    study_ref,
    write_heartbeat,
)
from dicom_agent.scheduler import Scheduler
from dicom_agent.scp import Listener, start_listener
from dicom_agent.state import DraftState, JobState, StateDB, StudyState
from dicom_agent.worker import AuditorFactory, Models, Worker, default_auditor_factory

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "agent-status.json"
HEARTBEAT_SECONDS = 2.0


def heartbeat_path(settings: AgentSettings) -> Path:
    return settings.paths.state.parent / HEARTBEAT_FILE


class Agent:
    """One agent process. ``auditor_factory`` replaces model loading (tests)."""

    def __init__(
        self, settings: AgentSettings, *, auditor_factory: AuditorFactory | None = None
    ) -> None:
        self.settings = settings
        settings.ensure_folders()
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
        self.listener: Listener | None = None
        self.health: HealthServer | None = None
        self.started_at: float | None = None
        self._stopped = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        rebuilt = spool.reconcile(self.db, self.settings.paths.spool)
        requeued = self.db.requeue_running()
        # A crash while outputs were written leaves temp files; their jobs were just
        # requeued and write everything again.
        temps = remove_stale_temps(self.settings.paths.out)
        if temps:
            log.info("%d output temp files of a crashed run removed", temps)
        log.info(
            "state reconciled: %d spool rows rebuilt, %d running jobs requeued", rebuilt, requeued,
            extra=event(event=Event.STATE_RECONCILED, count=rebuilt + requeued),
        )
        scp, health = self.settings.scp, self.settings.health
        try:
            self.listener = start_listener(self.settings, self.db, on_stored=self._on_stored)
        except OSError as exc:
            raise ConfigError(f"scp.port: cannot listen on {scp.host}:{scp.port}: {exc.strerror}") from exc
        self.scheduler.start()
        self.worker.start()
        if health.enabled:
            try:
                self.health = HealthServer(
                    health.host, health.port, self.snapshot, self._render_metrics
                )
            except OSError as exc:
                raise ConfigError(
                    f"health.port: cannot listen on {health.host}:{health.port}: {exc.strerror}"
                ) from exc
            self.health.start()
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
        self.heartbeat(stopped=True)
        self.db.close()
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
        self.metrics.instances_stored.labels("stored").inc()
        ref = study_ref(study_uid)
        log.debug("instance stored", extra=event(event=Event.INSTANCE_STORED, study=ref))
        if self.db.latest_audit_job(study_uid) is not None:
            log.info(
                "late instance: study receiving again, it will be re-audited",
                extra=event(event=Event.STUDY_REOPENED, study=ref, state=StudyState.RECEIVING),
            )

    def _render_metrics(self) -> bytes:
        self.metrics.refresh(self.db)
        return self.metrics.render()

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


def status_counts(db: StateDB) -> dict[str, Any]:
    """Queue depths, waiting studies, orphans and dead jobs (with their errors) from the DB."""
    counts = db.counts()
    dead = [
        {
            "job_id": j.id,
            "kind": j.kind,
            "study": study_ref(j.study_instance_uid),
            "attempts": j.attempts,
            "error": (j.last_error or "").splitlines()[0][:300] if j.last_error else None,
        }
        for j in db.jobs(JobState.DEAD)
    ]
    retrying = [
        {"job_id": j.id, "kind": j.kind, "study": study_ref(j.study_instance_uid), "attempts": j.attempts,
         "next_attempt_at": j.next_attempt_at, "error": (j.last_error or "").splitlines()[0][:300]}
        for j in db.jobs(JobState.QUEUED)
        if j.last_error
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
