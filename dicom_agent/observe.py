"""Observability: structured logs with a fixed event vocabulary, Prometheus metrics, health.

Logs never carry patient data. A study is referred to by :func:`study_ref`, a short salted
hash of its Study Instance UID (the salt lives beside the state database, so references stay
stable across restarts but cannot be reversed from a list of UIDs). Event names come from
:class:`Event`; docs/logging.md lists them with their fields.

The HTTP endpoints (``/healthz``, ``/readyz``, ``/metrics``) are served by the results browser's
server, :mod:`dicom_agent.web`; :class:`Metrics` here holds what ``/metrics`` exposes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt

from cxr_auditor.schema import AuditResult
from dicom_agent.config import LoggingSettings
from dicom_agent.files import atomic_write_text
from dicom_agent.state import QUEUE_TABLES, DraftState, JobState, StateDB, StudyState

log = logging.getLogger(__name__)


class Event(StrEnum):
    """Every event name the agent logs (field ``event`` of a log record)."""

    AGENT_STARTED = "agent.started"
    AGENT_STOPPING = "agent.stopping"
    AGENT_STOPPED = "agent.stopped"
    STATE_RECONCILED = "state.reconciled"
    INSTANCE_STORED = "instance.stored"
    STUDY_SETTLED = "study.settled"
    STUDY_REOPENED = "study.reopened"
    DRAFT_ACCEPTED = "draft.accepted"
    DRAFT_DUPLICATE = "draft.duplicate"
    DRAFT_REJECTED = "draft.rejected"
    DRAFT_RETRY = "draft.retry"
    DRAFT_PAIRED = "draft.paired"
    DRAFT_ORPHAN = "draft.orphan"
    DRAFT_AMBIGUOUS = "draft.ambiguous"
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_RETRY = "job.retry"
    JOB_DEAD = "job.dead"
    JOB_WAITING_MODEL = "job.waiting_model"
    AUDIT_DONE = "audit.done"
    MODEL_LOADED = "model.loaded"
    MODEL_UNAVAILABLE = "model.unavailable"
    SR_FORWARDED = "sr.forwarded"
    HOUSEKEEPING_DONE = "housekeeping.done"
    SCHEDULER_ERROR = "scheduler.error"
    FINAL_ACCEPTED = "final.accepted"
    FINAL_DUPLICATE = "final.duplicate"
    FINAL_REJECTED = "final.rejected"
    FINAL_RETRY = "final.retry"
    FINAL_COMPARED = "final.compared"


# -- PHI-safe references ------------------------------------------------------------------------

_SALT_FILE = "log-salt"
_salt: bytes = secrets.token_bytes(16)


def load_salt(state_dir: Path) -> None:
    """Use the installation's salt (created once, mode 0600) for :func:`study_ref`."""
    global _salt
    path = state_dir / _SALT_FILE
    if not path.exists():
        atomic_write_text(path, secrets.token_hex(16))
        path.chmod(0o600)
    _salt = bytes.fromhex(path.read_text(encoding="ascii").strip())


def study_ref(study_uid: str | None) -> str:
    """A short salted hash standing for a Study Instance UID (or any other key) in logs."""
    if not study_uid:
        return "-"
    return hmac.new(_salt, study_uid.encode(), hashlib.sha256).hexdigest()[:12]


# -- logging -----------------------------------------------------------------------------------

#: Record attributes copied into JSON lines when a caller passes them in ``extra``.
EVENT_FIELDS = (
    "event",
    "study",
    "job_id",
    "draft_id",
    "state",
    "reason",
    "attempt",
    "result_version",
    "profile",
    "mode",
    "count",
    "ms",
)


def event(**fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call: ``log.info("...", extra=event(event=Event.X, job_id=3))``."""
    return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in fields.items()}


# A DICOM UID (PS3.5 9.1) of five or more components; instance, series and study UIDs are
# always that long, IP addresses and version numbers are not.
_UID_RE = re.compile(r"(?<![\d.])[0-2](?:\.\d+){4,}(?![\d.])")
# UIDs under the DICOM standard's own root name SOP classes and transfer syntaxes, never an
# instance: they stay readable.
_STANDARD_UID_ROOT = "1.2.840.10008."


def redact_uids(text: str) -> str:
    """``text`` with every non-standard DICOM UID replaced by ``uid:<study_ref of it>``.

    The last guard of STYLE.md section 4: whatever a library or an exception message says,
    no SOP Instance (or Study, Series) UID reaches a log line in clear text.
    """
    return _UID_RE.sub(
        lambda m: m[0] if m[0].startswith(_STANDARD_UID_ROOT) else f"uid:{study_ref(m[0])}",
        text,
    )


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the fixed event fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact_uids(record.getMessage()),
        }
        for name in EVENT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = redact_uids(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the event fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact_uids(super().format(record))
        extras = [
            f"{n}={getattr(record, n)}" for n in EVENT_FIELDS if getattr(record, n, None) is not None
        ]
        return f"{line} [{' '.join(extras)}]" if extras else line


#: Loggers of this project; everything else is a library's and logs at ``library_level``.
OWN_LOGGERS = ("dicom_agent", "cxr_auditor")


class _SkippedRunFilter(logging.Filter):
    """Drops apscheduler's "skipped: maximum number of running instances reached" warning.

    Every interval job of the agent is coalesced with ``max_instances=1`` on purpose: a tick
    that finds the previous run still going (an outbox drain waiting out a stalled PACS for
    ``forward.network_timeout_seconds``) is meant to be skipped, and the warning repeated
    every interval (five a second for the outbox in the tests) while saying nothing new.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


def setup_logging(cfg: LoggingSettings, stream: Any = None) -> None:
    """Configure logging for ``serve``: our loggers at ``level``, all others (the root) at
    ``library_level`` (WARNING by default).

    pynetdicom logs identifiers and whole datasets at DEBUG/INFO, highdicom names every SOP
    Instance UID it adds at INFO; WARNING keeps them out, and :func:`redact_uids` in both
    formatters catches what a lower level or an exception message would let through
    (STYLE.md section 4).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if cfg.json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.library_level.upper())
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(cfg.level.upper())
    # Belt and braces: even if someone lowers pynetdicom's level, no query/response
    # identifiers (patient data) are logged.
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    apscheduler_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _SkippedRunFilter) for f in apscheduler_log.filters):
        apscheduler_log.addFilter(_SkippedRunFilter())


# -- metrics -----------------------------------------------------------------------------------


class Metrics:
    """The agent's Prometheus metrics, in a registry of their own (one per Agent)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_stored = Counter(
            "cxr_agent_instances_stored", "Instances stored by the listener", ["outcome"],
            registry=r,
        )
        self.drafts = Counter(
            "cxr_agent_drafts", "Draft files handled, by outcome", ["outcome"], registry=r
        )
        self.job_events = Counter(
            "cxr_agent_job_events", "Audit job events (started, done, retry, dead)", ["event"],
            registry=r,
        )
        self.jobs = Gauge("cxr_agent_jobs", "Jobs by state", ["state"], registry=r)
        self.studies = Gauge("cxr_agent_studies", "Studies by state", ["state"], registry=r)
        self.orphans = Gauge("cxr_agent_orphan_drafts", "Drafts with no study", registry=r)
        self._monitoring_metrics(r)
        self._audit_metrics(r)
        self._listener_metrics(r)
        self._listener_server: Any = None

    def _monitoring_metrics(self, r: CollectorRegistry) -> None:
        # Monitoring against final reports (dicom_agent.finals): rates over the sliding window
        # of the newest monitoring.window_cases agreements per profile and label.
        self.finals = Counter(
            "cxr_agent_finals", "Final report files handled, by outcome", ["outcome"], registry=r
        )
        self.monitor_sensitivity = Gauge(
            "cxr_agent_monitor_sensitivity",
            "Share of final-report positives the model (source=model) or draft found, window",
            ["profile", "label", "source"],
            registry=r,
        )
        self.monitor_specificity = Gauge(
            "cxr_agent_monitor_specificity",
            "Share of final-report negatives the model or draft left negative, window",
            ["profile", "label", "source"],
            registry=r,
        )
        self.monitor_cases = Gauge(
            "cxr_agent_monitor_window_cases",
            "Agreements in the window, by profile and label", ["profile", "label"], registry=r,
        )
        self.monitor_flag_confirmed = Gauge(
            "cxr_agent_monitor_flag_confirmed_ratio",
            "Share of flags the final report confirmed, window (missing/urgent: final positive;"
            " unsupported: final negative)",
            ["profile", "kind"],
            registry=r,
        )

    def _audit_metrics(self, r: CollectorRegistry) -> None:
        self.model_available = Gauge(
            "cxr_agent_model_available", "1 when the grounding model is loaded", registry=r
        )
        self.audit_seconds = Histogram(
            "cxr_agent_audit_seconds",
            "Wall time of one audit job, decode to outputs",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "cxr_agent_stage_seconds",
            "Wall time of one stage of an audit (the timings of audit.json), by stage",
            ["stage"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.flags = Counter(
            "cxr_agent_flags", "Flags raised by finished audits, by kind", ["kind"], registry=r
        )

    def _listener_metrics(self, r: CollectorRegistry) -> None:
        self.associations_active = Gauge(
            "cxr_agent_associations_active", "DICOM associations open now", registry=r
        )
        self.associations_rejected = Counter(
            "cxr_agent_associations_rejected",
            "Associations the listener rejected (calling AE, context or resources)",
            registry=r,
        )
        self.bytes_received = Counter(
            "cxr_agent_bytes_received", "Bytes of DICOM PDUs received by the listener", registry=r
        )
        self.listener_events = Gauge(
            "cxr_agent_listener_events",
            "Listener events since start, by event: C-STORE outcomes (new, duplicate, replaced,"
            " kept_first, malformed, too_large, out_of_resources, failed) and refusals"
            " (pdu_too_long, connections_refused, per_address_limit)",
            ["event"],
            registry=r,
        )
        self.spool_reserved = Gauge(
            "cxr_agent_spool_reserved_bytes",
            "Free space reserved by data sets being written to the spool right now",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "cxr_agent_gpu_memory_bytes",
            "GPU memory held by this process's models (torch), by device; absent without a GPU",
            ["device", "kind"],
            registry=r,
        )

    def refresh(self, db: StateDB) -> None:
        """Update the gauges from the state database and the process (called on every scrape)."""
        counts = db.counts(QUEUE_TABLES)
        for state in JobState:
            self.jobs.labels(state.value).set(counts["jobs"].get(state.value, 0))
        for sstate in StudyState:
            self.studies.labels(sstate.value).set(counts["studies"].get(sstate.value, 0))
        self.orphans.set(counts["drafts"].get(DraftState.ORPHAN.value, 0))
        if self._listener_server is not None:
            server = self._listener_server
            self.associations_active.set(len(server.active_associations))
            for name, value in server.counters.snapshot().items():
                self.listener_events.labels(name).set(value)
            self.spool_reserved.set(server.spool.reserved_bytes)
        self._refresh_gpu()

    def watch_listener(self, server: Any) -> None:
        """Count rejected associations and received bytes of the listener's server
        (:class:`~dicom_agent.transport.ListenerServer`; its event counters and the spool's
        reservation are read on every scrape).

        Binds to the server's events (PS3.8 A-ASSOCIATE-RJ, and every PDU's raw bytes), so the
        counters see exactly what the listener sees. Listener worker processes
        (``scp.workers`` > 1) have their own servers and are not counted here.
        """
        self._listener_server = server
        server.bind(evt.EVT_REJECTED, lambda event: self.associations_rejected.inc())
        server.bind(evt.EVT_DATA_RECV, lambda event: self.bytes_received.inc(len(event.data)))

    def observe_result(self, result: AuditResult) -> None:
        """Count a finished audit's flags by kind and its stage timings (ms in audit.json)."""
        for flag in result.flags:
            self.flags.labels(flag.kind.value).inc()
        for stage, value in result.timings.items():
            self.stage_seconds.labels(stage.removesuffix("_ms")).observe(value / 1000.0)

    def _refresh_gpu(self) -> None:
        # Only when the models already imported torch: a scrape must not import it (seconds, and
        # hundreds of MB) on an agent that runs its models elsewhere.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            self.gpu_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
            self.gpu_memory.labels(device, "reserved").set(torch.cuda.memory_reserved(index))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def write_heartbeat(path: Path, body: dict[str, Any]) -> None:
    """Write the running agent's status file for ``cxr-agent status`` (atomically)."""
    atomic_write_text(path, json.dumps({**body, "updated_at": time.time()}, default=str))
