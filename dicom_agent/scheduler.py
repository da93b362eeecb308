"""Scheduling: when a study is complete, which draft it pairs with, when it is audited.

Every rule is a pure function of a state row, the current time and the settings, so tests
pass the clock and never sleep (mercure's "complete means quiet for N seconds"):

- :func:`is_settled`: no new instance for ``pairing.settle_seconds``;
- :func:`decide`: what a study needs next (wait for a draft, queue an audit, nothing);
- :func:`is_orphan`: a draft whose study has not arrived after ``pairing.study_wait_seconds``;
- exponential backoff of failed jobs: :func:`dicom_agent.state.retry_delay`.

:class:`Scheduler` applies them from apscheduler interval jobs (BackgroundScheduler): the
drafts poll, the pairing tick, housekeeping, the forward outbox and the status heartbeat. A
scheduler job logs and returns on error; the next tick tries again.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_agent import forward
from dicom_agent.config import AgentSettings, PairingSettings
from dicom_agent.errors import StateError
from dicom_agent.inbox import DraftReader
from dicom_agent.observe import Event, event, study_ref
from dicom_agent.outputs.layout import study_dir
from dicom_agent.spool import expire_quarantine, expire_study
from dicom_agent.state import (
    DraftRow,
    DraftState,
    JobRow,
    JobState,
    StateDB,
    StudyRow,
    StudyState,
)

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400.0


# -- pure rules -------------------------------------------------------------------------------


def is_settled(last_instance_at: float, now: float, settle_seconds: float) -> bool:
    """A study is settled once no instance has arrived for ``settle_seconds``."""
    return now - last_instance_at >= settle_seconds


def is_orphan(received_at: float, now: float, study_wait_seconds: float) -> bool:
    """A draft is an orphan once its study has not arrived for ``study_wait_seconds``."""
    return now - received_at >= study_wait_seconds


class Action(StrEnum):
    NOTHING = "nothing"
    WAIT_DRAFT = "wait_draft"  # settled, no draft: start the draft wait
    QUEUE = "queue"  # queue an audit (or re-point the queued one)


class Reason(StrEnum):
    """Why an audit was queued (kept in the job payload and logged)."""

    DRAFT = "draft"
    IMAGE_ONLY = "image_only"
    DRAFT_CHANGED = "draft_changed"
    LATE_INSTANCE = "late_instance"
    REAUDIT = "reaudit"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason | None = None


_NOTHING = Decision(Action.NOTHING)
_OPEN = (JobState.QUEUED.value, JobState.WAITING_MODEL.value)


def decide(
    study: StudyRow,
    draft: DraftRow | None,
    latest_job: JobRow | None,
    now: float,
    pairing: PairingSettings,
) -> Decision:
    """What a study needs next, from its row, its current draft and its latest audit job.

    - receiving: once settled, audit if there is a draft or it was audited before (a late
      instance re-audits), else wait for a draft;
    - waiting for a draft: audit when one is paired, or image-only when the wait expires and
      the policy is ``image_only``;
    - any later state: a paired draft that the latest audit job did not use re-audits.
    """
    state = StudyState(study.state)
    draft_is_new = draft is not None and (latest_job is None or latest_job.draft_id != draft.id)
    if state is StudyState.RECEIVING:
        if not is_settled(study.last_instance_at, now, pairing.settle_seconds):
            return _NOTHING
        if latest_job is not None:  # audited before: new images arrived since
            return Decision(Action.QUEUE, Reason.LATE_INSTANCE)
        if draft is not None:
            return Decision(Action.QUEUE, Reason.DRAFT)
        return Decision(Action.WAIT_DRAFT)
    if state is StudyState.WAITING_DRAFT:
        if draft is not None:
            return Decision(Action.QUEUE, Reason.DRAFT)
        settled_at = study.settled_at if study.settled_at is not None else now
        if pairing.no_draft_policy == "image_only" and now - settled_at >= pairing.draft_wait_seconds:
            return Decision(Action.QUEUE, Reason.IMAGE_ONLY)
        return _NOTHING
    if draft_is_new:
        return Decision(Action.QUEUE, Reason.DRAFT_CHANGED)
    return _NOTHING


def expired(timestamp: float, now: float, retention_days: float) -> bool:
    """Retention check; ``retention_days == 0`` keeps data forever."""
    return retention_days > 0 and now - timestamp >= retention_days * DAY_SECONDS


# -- applying the rules -------------------------------------------------------------------------


def pair_drafts(db: StateDB, now: float, study_wait_seconds: float) -> tuple[int, int]:
    """Pair pending and orphan drafts with their studies; mark long-unpaired ones orphan.

    Returns (paired, newly orphaned). An orphan is kept and still pairs when its study arrives.
    """
    paired = orphaned = 0
    for d in db.drafts((DraftState.PENDING, DraftState.ORPHAN)):
        studies = db.studies_for_key(d.key)
        if len(studies) > 1:
            # Two studies share the accession number: pairing with either could audit the
            # wrong images. Refused; the RIS can resend the draft named by Study Instance UID.
            db.set_draft_state(d.id, DraftState.AMBIGUOUS, now)
            log.warning(
                "draft refused: its accession number is held by %d studies; resend it named"
                " by Study Instance UID", len(studies),
                extra=event(event=Event.DRAFT_AMBIGUOUS, draft_id=d.id, count=len(studies)),
            )
            continue
        study_uid = studies[0] if studies else None
        if study_uid is not None:
            if db.pair_draft(d.id, study_uid, now):
                paired += 1
                log.info(
                    "draft paired",
                    extra=event(event=Event.DRAFT_PAIRED, draft_id=d.id, study=study_ref(study_uid)),
                )
            else:
                log.info(
                    "draft identical to the study's current one (other key); no re-audit",
                    extra=event(event=Event.DRAFT_DUPLICATE, draft_id=d.id,
                                study=study_ref(study_uid)),
                )
        elif d.state == DraftState.PENDING.value and is_orphan(d.received_at, now, study_wait_seconds):
            db.set_draft_state(d.id, DraftState.ORPHAN, now)
            orphaned += 1
            log.warning(
                "draft has no study after %.0f s; kept as orphan", study_wait_seconds,
                extra=event(event=Event.DRAFT_ORPHAN, draft_id=d.id),  # no study: no reference
            )
    return paired, orphaned


def schedule_studies(db: StateDB, now: float, pairing: PairingSettings) -> list[JobRow]:
    """Apply :func:`decide` to every study that may need something; returns the jobs queued."""
    queued: list[JobRow] = []
    for study in db.studies_to_schedule():
        uid = study.study_instance_uid
        draft = db.current_draft(uid)
        latest = db.latest_audit_job(uid)
        decision = decide(study, draft, latest, now, pairing)
        if decision.action is Action.WAIT_DRAFT:
            db.set_study_state(uid, StudyState.WAITING_DRAFT, now, settled_at=now)
            log.info(
                "study settled; waiting for a draft",
                extra=event(event=Event.STUDY_SETTLED, study=study_ref(uid),
                            state=StudyState.WAITING_DRAFT),
            )
        elif decision.action is Action.QUEUE:
            assert decision.reason is not None
            if study.state == StudyState.RECEIVING.value:
                db.set_study_state(uid, StudyState.QUEUED, now, settled_at=now)
                log.info(
                    "study settled",
                    extra=event(event=Event.STUDY_SETTLED, study=study_ref(uid),
                                state=StudyState.QUEUED),
                )
            job = queue_audit(db, uid, draft.id if draft else None, decision.reason, now)
            queued.append(job)
    return queued


def queue_audit(
    db: StateDB, study_uid: str, draft_id: int | None, reason: Reason, now: float
) -> JobRow:
    """Queue (or re-point) the audit of a study and log it."""
    job = db.queue_audit(study_uid, draft_id, reason.value, now)
    log.info(
        "audit queued (%s)", reason.value,
        extra=event(event=Event.JOB_QUEUED, study=study_ref(study_uid), job_id=job.id,
                    reason=reason, result_version=job.result_version, state=StudyState.QUEUED),
    )
    return job


def reaudit_study(db: StateDB, study_uid: str, now: float) -> JobRow:
    """Queue a new audit version of a received study with its current draft: ``cxr-agent
    reaudit`` and the results browser's Re-audit and dead-job Retry.

    Raises:
        StateError: the study's images are gone (spool retention), so nothing can be audited.
    """
    if not db.instances_of_study(study_uid):
        raise StateError(
            "the study's images are gone (housekeeping.spool_retention_days); send it again"
        )
    draft = db.current_draft(study_uid)
    return queue_audit(db, study_uid, draft.id if draft else None, Reason.REAUDIT, now)


def housekeeping(db: StateDB, settings: AgentSettings, now: float) -> tuple[int, int]:
    """Remove spool files and result folders past retention, for audited studies only.

    A study whose latest audit is not done keeps everything: its images may still be needed.
    Returns (spool files removed, result folders removed).
    """
    hk = settings.housekeeping
    spool_root = settings.paths.spool.resolve()
    files = folders = 0
    for study in db.studies((StudyState.AUDITED,)):
        uid = study.study_instance_uid
        if expired(study.last_instance_at, now, hk.spool_retention_days):
            files += expire_study(
                db, spool_root, uid, now - hk.spool_retention_days * DAY_SECONDS
            )
        result_dir = study_dir(settings, uid)
        if expired(study.updated_at, now, hk.results_retention_days) and result_dir.is_dir():
            shutil.rmtree(result_dir)
            folders += 1
    # Studies that will not be audited on their own (dead-lettered, or never paired with a
    # draft under no_draft_policy=wait) would otherwise fill the spool until C-STORE is refused.
    stuck = (
        (StudyState.FAILED, hk.failed_retention_days),
        (StudyState.WAITING_DRAFT, hk.unpaired_retention_days),
    )
    for state, days in stuck:
        for study in db.studies((state,)):
            if expired(study.last_instance_at, now, days):
                files += expire_study(
                    db, spool_root, study.study_instance_uid, now - days * DAY_SECONDS, (state,)
                )
    quarantined = 0
    if hk.quarantine_retention_days > 0:
        quarantined = expire_quarantine(
            settings.paths.quarantine, now - hk.quarantine_retention_days * DAY_SECONDS
        )
    if files or folders or quarantined:
        log.info(
            "housekeeping removed %d spool files, %d result folders, %d quarantined data sets",
            files, folders, quarantined,
            extra=event(event=Event.HOUSEKEEPING_DONE, count=files + folders + quarantined),
        )
    return files, folders


# -- the apscheduler wiring ---------------------------------------------------------------------


class Scheduler:
    """Interval jobs of a running agent on a BackgroundScheduler (one thread pool)."""

    def __init__(
        self,
        settings: AgentSettings,
        db: StateDB,
        drafts: DraftReader,
        *,
        heartbeat: Callable[[], None] | None = None,
        heartbeat_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.db = db
        self.drafts = drafts
        self.clock = clock
        self._sched = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        self.add_job(self.poll_drafts, settings.drafts.poll_seconds, "drafts")
        self.add_job(self.tick, settings.pairing.poll_seconds, "pairing")
        self.add_job(self.housekeep, settings.housekeeping.interval_seconds, "housekeeping")
        if settings.forward.enabled:
            self.add_job(self.drain_forward, settings.pairing.poll_seconds, "forward")
        if heartbeat is not None:
            self.add_job(heartbeat, heartbeat_seconds, "heartbeat")

    def add_job(self, fn: Callable[[], object], seconds: float, name: str) -> None:
        """A guarded interval job (the agent adds the finals monitor); call before :meth:`start`."""
        self._sched.add_job(_guarded(fn, name), "interval", seconds=seconds, id=name, name=name)

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    def start(self) -> None:
        self._sched.start()

    def stop(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)

    # Each method is one interval job; they are public so tests and `reaudit` can call them.

    def poll_drafts(self) -> None:
        self.drafts.poll(self.clock())

    def tick(self) -> list[JobRow]:
        now = self.clock()
        pair_drafts(self.db, now, self.settings.pairing.study_wait_seconds)
        return schedule_studies(self.db, now, self.settings.pairing)

    def housekeep(self) -> None:
        housekeeping(self.db, self.settings, self.clock())

    def drain_forward(self) -> None:
        sent = forward.drain_outbox(self.db, self.settings, self.clock())
        if sent:
            log.info("results forwarded", extra=event(event=Event.SR_FORWARDED, count=sent))


def _guarded(fn: Callable[[], object], name: str) -> Callable[[], None]:
    """A scheduler job logs its failure and returns; the next interval tries again."""

    def run() -> None:
        try:
            fn()
        except Exception as exc:
            # Exception texts can name files (draft names carry accession numbers): the
            # traceback goes to DEBUG only, the ERROR line names the type.
            log.error(
                "scheduler job %s failed: %s", name, type(exc).__name__,
                extra=event(event=Event.SCHEDULER_ERROR),
            )
            log.debug("scheduler job %s traceback", name, exc_info=True)

    return run
