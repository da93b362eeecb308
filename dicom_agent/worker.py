"""The worker: runs queued audit jobs through the model, in batches, and writes the results.

One worker thread owns the model. Per batch it:

1. claims up to ``worker.batch_size`` due jobs (waiting up to ``worker.batch_wait_seconds`` for
   the batch to fill);
2. prepares them on a small decode pool (:mod:`dicom_agent.prepare`: routing, decoding and
   windowing, the study's current draft);
3. runs the profile's runner from :mod:`dicom_agent.registry` on the whole batch (one grounder
   call);
4. hands the results to a single output thread that writes them (``write_outputs``, in the
   version folder :mod:`dicom_agent.outputs.layout` names), marks the jobs done and queues
   forwarding.

While the model works on one batch the decode pool already prepares the next, and the previous
batch's outputs are being written, so CPU work overlaps with the model.

Errors are caught per job: a failure records its reason in the job row and schedules a retry
with exponential backoff (:meth:`dicom_agent.state.StateDB.fail_job`, shared with forward jobs); after
``worker.max_attempts`` the job is dead-lettered. A model that cannot be loaded (no weights, no
GPU) never loses work: jobs wait in ``waiting_model`` and the load is retried every
``worker.model_retry_seconds``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cxr_auditor.errors import ModelUnavailable
from cxr_auditor.schema import AuditResult
from dicom_agent import forward
from dicom_agent.config import AgentSettings
from dicom_agent.observe import Event, Metrics, event, study_ref
from dicom_agent.outputs.layout import free_version, objects_to_send, study_dir
from dicom_agent.outputs.writer import write_outputs
from dicom_agent.prepare import (
    Draft,
    PreparedStudy,
    prepare_study,
    profile_routes,
    stored_study_keys,
)
from dicom_agent.registry import AuditRunner, Models
from dicom_agent.routing import ProfileRoutes
from dicom_agent.state import JobRow, JobState, StateDB

log = logging.getLogger(__name__)

#: Batches the worker holds at once: decoding, on the model, being written.
_PIPELINE_BATCHES = 3

_T = TypeVar("_T")


# -- one job ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A claimed job with its prepared study, or the error that kept it from being prepared."""

    job: JobRow
    started: float
    study: PreparedStudy | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Worker:
    """Runs audit jobs; :meth:`start` runs the loop in a thread, :meth:`run_once` one batch."""

    def __init__(
        self,
        settings: AgentSettings,
        db: StateDB,
        models: Models,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        decode_threads: int = 2,
    ) -> None:
        self.settings = settings
        self.db = db
        self.models = models
        self.metrics = metrics
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="outputs")
        self._idle_seconds = min(0.5, settings.pairing.poll_seconds)
        self._inflight: set[int] = set()  # claimed jobs not yet done, failed or parked
        self._loads_seen = 0  # Models.loads when parked jobs were last requeued
        self._inflight_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch in hand; jobs claimed but not run go back to the queue."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._decode.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        self._requeue_inflight()

    def _requeue_inflight(self) -> None:
        """Put claimed jobs that are neither done, failed nor parked back in the queue.

        Call only when no output write is pending (the writer would finish those jobs).
        """
        with self._inflight_lock:
            leftover, self._inflight = sorted(self._inflight), set()
        now = self.clock()
        for job_id in leftover:
            try:
                self.db.transition_job(job_id, JobState.QUEUED, now, next_attempt_at=now)
            except Exception:  # a crash-style restart requeues it anyway
                log.warning("job %d left running", job_id, exc_info=True)

    def _settled(self, job_id: int) -> None:
        with self._inflight_lock:
            self._inflight.discard(job_id)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        pending: Future[list[Prepared]] | None = None
        while not self._stop.is_set():
            try:
                if not self._model_ready():
                    if pending is not None:  # a prefetched batch waits with the others
                        self._park(pending.result(), self.settings.grounding.profile)
                        pending = None
                    self._stop.wait(self._idle_seconds)
                    continue
                if pending is None:
                    batch = self._claim_batch(wait=True)
                    if not batch:
                        self._stop.wait(self._idle_seconds)
                        continue
                    pending = self._decode.submit(self._prepare_all, batch)
                prepared = pending.result()
                # Prefetch: the next batch decodes while this one is on the model.
                nxt = self._claim_batch(wait=False)
                pending = self._decode.submit(self._prepare_all, nxt) if nxt else None
                self._audit(prepared)
            except Exception:  # the worker must survive anything; the jobs are retried
                log.exception("worker loop error")
                if pending is not None:  # let a prefetch in progress finish before requeueing
                    with contextlib.suppress(Exception):
                        pending.result()
                    pending = None
                # Jobs claimed for this or the prefetched batch would stay "running" until a
                # restart: once the writer has finished what it holds, queue the rest again.
                self._writer.submit(lambda: None).result()
                self._requeue_inflight()
                self._stop.wait(self._idle_seconds)
        if pending is not None:
            pending.cancel()

    def run_once(self) -> int:
        """Claim, prepare, audit and write one batch synchronously; returns jobs handled."""
        if not self._model_ready():
            return 0
        batch = self._claim_batch(wait=False)
        if not batch:
            return 0
        self._audit(self._prepare_all(batch))
        self._writer.submit(lambda: None).result()  # wait for the outputs of this batch
        return len(batch)

    def _model_ready(self) -> bool:
        """Load the grounding model if needed; while it is unavailable, park queued jobs.

        Jobs parked in ``waiting_model`` go back to the queue whenever a model has loaded since
        they were last requeued: after a retry that succeeded, and after a restart (the first
        load of a process), since parked jobs outlive the process that parked them.
        """
        now = self.clock()
        self.models.retry_due()
        if self.models.get(self.settings.grounding.profile) is not None:
            loads = self.models.loads
            if loads != self._loads_seen:
                self._loads_seen = loads
                moved = self.db.move_jobs(JobState.WAITING_MODEL, JobState.QUEUED, now)
                if moved:
                    log.info("model available; %d waiting jobs requeued", moved,
                             extra=event(event=Event.JOB_QUEUED, count=moved))
            return True
        moved = self.db.move_jobs(JobState.QUEUED, JobState.WAITING_MODEL, now)
        if moved:
            log.warning(
                "%d audit jobs waiting for the model (profile %s)", moved,
                self.settings.grounding.profile,
                extra=event(event=Event.JOB_WAITING_MODEL, count=moved,
                            profile=self.settings.grounding.profile),
            )
        return False

    def _claim_batch(self, *, wait: bool) -> list[JobRow]:
        """Claim the next batch, unless the pipeline already holds its share of jobs.

        Back-pressure: at most ``_PIPELINE_BATCHES`` batches are held at once (one decoding,
        one on the model, one being written). When outputs are slower than the model the
        worker stops claiming instead of pulling the whole backlog into memory.
        """
        size = self.settings.worker.batch_size
        with self._inflight_lock:
            room = _PIPELINE_BATCHES * size - len(self._inflight)
        if room < size:
            return []
        jobs = self.db.claim_audit_jobs(size, self.clock())
        if wait and jobs and len(jobs) < size:
            deadline = time.monotonic() + self.settings.worker.batch_wait_seconds
            while len(jobs) < size and time.monotonic() < deadline and not self._stop.is_set():
                self._stop.wait(min(0.05, self.settings.worker.batch_wait_seconds))
                jobs += self.db.claim_audit_jobs(size - len(jobs), self.clock())
        with self._inflight_lock:
            self._inflight.update(job.id for job in jobs)
        for job in jobs:
            log.info(
                "audit started (attempt %d)", job.attempts,
                extra=event(event=Event.JOB_STARTED, job_id=job.id,
                            study=study_ref(job.study_instance_uid), attempt=job.attempts,
                            result_version=job.result_version),
            )
            if self.metrics is not None:
                self.metrics.job_events.labels("started").inc()
        return jobs

    # -- stage 1: prepare (decode pool) -----------------------------------------------------

    def _prepare_all(self, jobs: list[JobRow]) -> list[Prepared]:
        routes = profile_routes(self.settings)  # profiles are re-read once per batch, not per job
        return [self._prepare(job, routes) for job in jobs]

    def _prepare(self, job: JobRow, routes: dict[str, ProfileRoutes]) -> Prepared:
        prep = Prepared(job=job, started=time.monotonic())
        t0 = time.perf_counter()
        uid = job.study_instance_uid
        try:
            study = self.db.study(uid)
            # The job audits the study's draft as it is now; recording it here tells the
            # scheduler that a draft arriving later needs another version.
            draft = self.db.current_draft(uid)
            self.db.set_job_draft(job.id, draft.id if draft else None, self.clock())
            prep.study = prepare_study(
                self.db.instances_of_study(uid),
                self.settings,
                study=stored_study_keys(uid, study),
                draft=Draft.of(draft),
                result_version=job.result_version or 1,
                routes=routes,
                log_fields={"job_id": job.id, "study": study_ref(uid)},
            )
        except Exception as exc:
            prep.error = exc
        prep.timings["decode_ms"] = (time.perf_counter() - t0) * 1000
        return prep

    # -- stage 2: the model (worker thread) -------------------------------------------------

    def _audit(self, prepared: list[Prepared]) -> None:
        by_profile: dict[str, list[Prepared]] = {}
        for prep in prepared:
            if prep.error is not None:
                self._fail(prep.job, prep.error)
                continue
            assert prep.study is not None
            by_profile.setdefault(prep.study.profile, []).append(prep)
        for profile, group in by_profile.items():
            auditor = self.models.get(profile)
            if auditor is None:
                self._park(group, profile)
                continue
            t0 = time.perf_counter()
            items = [p.study.item for p in group if p.study is not None]
            try:
                results = _call_with_timeout(
                    functools.partial(auditor.audit_batch, items),
                    self.settings.worker.job_timeout_seconds,
                )
            except ModelUnavailable as exc:
                self.models.lost(profile, f"{type(exc).__name__}: {exc}")
                self._park(group, profile)
                continue
            except TimeoutError as exc:
                # The call is abandoned in its thread; a fresh model is loaded for the retry
                # rather than sharing the stuck one.
                self.models.lost(profile, "model call timed out")
                for prep in group:
                    self._fail(prep.job, exc)
                continue
            except Exception:
                # Isolate the job that broke the batch: run each one alone.
                log.warning("batch of %d failed; auditing its jobs one by one", len(group),
                            exc_info=True)
                for prep in group:
                    self._audit_one(auditor, prep)
                continue
            model_ms = (time.perf_counter() - t0) * 1000
            for prep, result in zip(group, results, strict=True):
                prep.timings["model_ms"] = model_ms
                self._writer.submit(self._finish, prep, result)

    def _audit_one(self, auditor: AuditRunner, prep: Prepared) -> None:
        t0 = time.perf_counter()
        assert prep.study is not None
        item = prep.study.item
        try:
            (result,) = _call_with_timeout(
                functools.partial(auditor.audit_batch, [item]),
                self.settings.worker.job_timeout_seconds,
            )
        except Exception as exc:
            self._fail(prep.job, exc)
            return
        prep.timings["model_ms"] = (time.perf_counter() - t0) * 1000
        self._writer.submit(self._finish, prep, result)

    def _park(self, group: list[Prepared], profile: str) -> None:
        now = self.clock()
        for prep in group:
            self.db.transition_job(prep.job.id, JobState.WAITING_MODEL, now, next_attempt_at=now)
            self._settled(prep.job.id)
        log.warning(
            "%d audit jobs waiting for the model (profile %s)", len(group), profile,
            extra=event(event=Event.JOB_WAITING_MODEL, count=len(group), profile=profile),
        )

    # -- stage 3: outputs (writer thread) ---------------------------------------------------

    def _finish(self, prep: Prepared, result: AuditResult) -> None:
        job = prep.job
        uid = job.study_instance_uid
        try:
            t0 = time.perf_counter()
            # decode and model times are known now; writing outputs is timed in the log and
            # the histogram (it cannot be inside the file it is writing).
            result = result.model_copy(
                update={"timings": {**result.timings, **{k: round(v, 1) for k, v in prep.timings.items()}}}
            )
            folder = study_dir(self.settings, uid)
            result = free_version(
                folder, result, lambda at_least: self.db.renumber_job(job.id, at_least, self.clock())
            )
            final = write_outputs(
                result,
                sources=prep.study.sources,
                display=prep.study.display,
                study_dir=folder,
                settings=self.settings,
            )
            outputs_ms = (time.perf_counter() - t0) * 1000
            # Queue the sends before the job is done: a crash in between re-runs the job and
            # queues them again (same UIDs, so the PACS keeps one copy) instead of losing them.
            if self.settings.forward.enabled and self.settings.forward.destinations:
                files = objects_to_send(folder, final)
                if files:
                    forward.enqueue_forward(self.db, uid, files, self.settings.forward.destinations)
            # the browser's flag and profile filters read this brief, not every audit.json
            self.db.record_result(uid, final.result_version, prep.study.profile,
                                  [f.kind.value for f in final.flags], self.clock())
            self.db.transition_job(job.id, JobState.DONE, self.clock())
            self._settled(job.id)
        except Exception as exc:
            self._fail(job, exc)
            return
        if self.metrics is not None:
            self.metrics.job_events.labels("done").inc()
            self.metrics.audit_seconds.observe(time.monotonic() - prep.started)
            self.metrics.observe_result(final)
        log.info(
            "audit done (%s, %d flags, outputs %.0f ms)", final.mode.value, len(final.flags),
            outputs_ms,
            extra=event(event=Event.AUDIT_DONE, job_id=job.id, study=study_ref(uid),
                        result_version=final.result_version, mode=final.mode,
                        state="audited", ms=round(outputs_ms, 1)),
        )

    def _fail(self, job: JobRow, exc: BaseException) -> None:
        """Record the reason; retry with backoff, or dead-letter after the last attempt."""
        self._settled(job.id)
        now = self.clock()
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        w = self.settings.worker
        ref = study_ref(job.study_instance_uid)
        expected = isinstance(exc, (OSError, ValueError)) or type(exc).__module__.startswith(
            ("dicom_agent", "cxr_auditor")
        )
        try:
            row = self.db.fail_job(
                job.id, now, reason, max_attempts=w.max_attempts,
                backoff_seconds=w.retry_backoff_seconds,
                backoff_max_seconds=w.retry_backoff_max_seconds,
            )
            if row.state == JobState.DEAD.value:
                log.error(
                    "audit dead-lettered after %d attempts (%s)", job.attempts, type(exc).__name__,
                    exc_info=not expected,
                    extra=event(event=Event.JOB_DEAD, job_id=job.id, study=ref,
                                attempt=job.attempts, state="failed"),
                )
                if self.metrics is not None:
                    self.metrics.job_events.labels("dead").inc()
                return
            delay = row.next_attempt_at - now
        except Exception:
            log.exception("could not record the failure of job %d", job.id)
            return
        log.warning(
            "audit failed (%s); retry in %.0f s", type(exc).__name__, delay,
            exc_info=not expected,
            extra=event(event=Event.JOB_RETRY, job_id=job.id, study=ref, attempt=job.attempts),
        )
        if self.metrics is not None:
            self.metrics.job_events.labels("retry").inc()


def _call_with_timeout(fn: Callable[[], _T], timeout: float) -> _T:
    """Run ``fn`` in a daemon thread; TimeoutError after ``timeout`` seconds.

    A daemon thread (not an executor) so that a model call that never returns cannot keep the
    process from exiting on SIGTERM.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="model-call", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"model call exceeded worker.job_timeout_seconds={timeout:g}")
    if "error" in box:
        raise box["error"]
    return box["value"]

