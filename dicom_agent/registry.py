"""The model registry: one loaded runner per profile, and what ``status`` says about each.

A profile's runner (:class:`~cxr_auditor.pipeline.Auditor` with its draft parser, or
:class:`~cxr_auditor.pipeline.ClassificationAuditor`) is built by :func:`build_runner`, the
same for ``serve`` and ``cxr-agent audit``. :class:`Models` loads it on first use; a load that
fails (no weights, no GPU, server down) marks the profile ``unavailable`` with the reason and
is retried every ``worker.model_retry_seconds``. :attr:`Models.loads` counts successful loads,
so the worker knows when work parked for a model can run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cxr_auditor.classification import PatencyClassifier
from cxr_auditor.grounding import build_grounder
from cxr_auditor.pipeline import AuditItem, Auditor, ClassificationAuditor
from cxr_auditor.profiles import Profile, get_profile
from cxr_auditor.schema import AuditResult
from dicom_agent.config import AgentSettings
from dicom_agent.observe import Event, Metrics, event

log = logging.getLogger(__name__)


class AuditRunner(Protocol):
    """What the worker needs of a loaded profile: :class:`Auditor`, or
    :class:`ClassificationAuditor` for a ``task: classification`` profile."""

    def audit_batch(self, items: list[AuditItem]) -> list[AuditResult]: ...

    def close(self) -> None: ...


#: Builds the runner of one profile; raises ModelUnavailable / BackendError / ProfileError.
AuditorFactory = Callable[[str], AuditRunner]


def build_runner(profile: Profile, parser_name: str, settings: AgentSettings) -> AuditRunner:
    """The runner of ``profile``: a classifier for ``task: classification``, else the grounder
    with the draft parser ``parser_name``. Used by ``serve`` and by ``cxr-agent audit``."""
    if profile.task == "classification":
        return ClassificationAuditor(PatencyClassifier(profile))
    grounder = build_grounder(profile)
    try:
        # Imported here: a parser that cannot be built (missing extra, model-backed parser
        # without weights) makes the model unavailable instead of breaking start-up.
        from cxr_auditor.drafts import get_parser

        parser = get_parser(parser_name, profiles_dir=settings.paths.profiles)
    except BaseException:
        grounder.close()  # a loaded grounding model must not outlive a failed build
        raise
    return Auditor(grounder, parser, urgent=settings.audit.urgent_labels)


def default_auditor_factory(settings: AgentSettings) -> AuditorFactory:
    """Runners built from the configured profiles (``paths.profiles`` first) and parser."""

    def build(profile_name: str) -> AuditRunner:
        profile = get_profile(profile_name, settings.paths.profiles)
        return build_runner(profile, settings.drafts.parser, settings)

    return build


# -- model state ---------------------------------------------------------------------------------


@dataclass
class ModelStatus:
    """What ``status`` and ``/healthz`` report about one profile's model."""

    profile: str
    state: str = "not_loaded"  # not_loaded | loading | ready | unavailable
    reason: str | None = None
    since: float = field(default_factory=time.time)
    next_retry_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "state": self.state,
            "reason": self.reason,
            "since": self.since,
            "next_retry_at": self.next_retry_at,
        }


class Models:
    """Loaded auditors by profile name; a failed load is retried after ``retry_seconds``."""

    def __init__(
        self,
        factory: AuditorFactory,
        retry_seconds: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._factory = factory
        self._retry = retry_seconds
        self._metrics = metrics
        self._clock = clock
        self._auditors: dict[str, AuditRunner] = {}
        self._status: dict[str, ModelStatus] = {}
        self._lock = threading.Lock()
        self._loads = 0

    @property
    def loads(self) -> int:
        """Successful loads so far in this process: a change means work parked for a model
        may run now (first load after a start, or a retry that succeeded)."""
        with self._lock:
            return self._loads

    def get(self, profile: str) -> AuditRunner | None:
        """The profile's auditor, loading it if due; None while it is unavailable."""
        with self._lock:
            if profile in self._auditors:
                return self._auditors[profile]
            status = self._status.get(profile)
            now = self._clock()
            if status is not None and status.next_retry_at is not None and now < status.next_retry_at:
                return None
        return self._load(profile)

    def _load(self, profile: str) -> AuditRunner | None:
        now = self._clock()
        with self._lock:
            previous = self._status.get(profile)
            if previous is None or previous.state != "unavailable":
                # a big model takes a while: say so instead of "not_loaded"
                self._status[profile] = ModelStatus(profile, "loading", None, now, None)
        try:
            auditor = self._factory(profile)
        except Exception as exc:  # ModelUnavailable, BackendError, ProfileError, import errors
            reason = f"{type(exc).__name__}: {exc}"
            # "since" is when the model first became unavailable; retries keep it
            repeat = previous is not None and previous.state == "unavailable"
            since = previous.since if previous is not None and repeat else now
            first = not repeat
            with self._lock:
                self._status[profile] = ModelStatus(
                    profile, "unavailable", reason, since, now + self._retry
                )
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "model for profile %s unavailable (%s); audits wait, retry every %.0f s",
                profile, reason.splitlines()[0], self._retry,
                extra=event(event=Event.MODEL_UNAVAILABLE, profile=profile),
            )
            self._gauge()
            return None
        with self._lock:
            self._auditors[profile] = auditor
            self._status[profile] = ModelStatus(profile, "ready", None, now, None)
            self._loads += 1
        log.info("model for profile %s loaded", profile,
                 extra=event(event=Event.MODEL_LOADED, profile=profile))
        self._gauge()
        return auditor

    def lost(self, profile: str, reason: str) -> None:
        """The model failed with ModelUnavailable while running: unload it, retry later."""
        with self._lock:
            auditor = self._auditors.pop(profile, None)
            now = self._clock()
            self._status[profile] = ModelStatus(profile, "unavailable", reason, now, now + self._retry)
        if auditor is not None:
            _close(auditor)
        log.warning("model for profile %s became unavailable; audits wait", profile,
                    extra=event(event=Event.MODEL_UNAVAILABLE, profile=profile))
        self._gauge()

    def retry_due(self) -> None:
        """Retry every unavailable profile whose retry time has come (see :attr:`loads`)."""
        with self._lock:
            now = self._clock()
            due = [
                s.profile for s in self._status.values()
                if s.state == "unavailable" and s.next_retry_at is not None and now >= s.next_retry_at
            ]
        for name in due:  # every due profile, not just the first
            self._load(name)

    def status(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: s.as_dict() for name, s in self._status.items()}

    def close(self) -> None:
        with self._lock:
            auditors, self._auditors = list(self._auditors.values()), {}
        for auditor in auditors:
            _close(auditor)

    def _gauge(self) -> None:
        if self._metrics is not None:
            with self._lock:
                ready = all(s.state == "ready" for s in self._status.values())
            self._metrics.model_available.set(1 if ready else 0)


def _close(runner: AuditRunner) -> None:
    """Release a runner's models; a failure is logged, never raised (unloading goes on)."""
    try:
        runner.close()
    except Exception:
        log.warning("closing a model failed", exc_info=True)
