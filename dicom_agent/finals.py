"""Monitoring against signed final reports: did the model and the draft agree with the final?

When the signed final report of an audited study arrives later, dropped in ``paths.finals``
(named and formatted like a draft: ``<AccessionNumber>.txt``, ``<StudyInstanceUID>.txt`` or
the JSON form, or exported by the PACS as a DICOM SR file ``*.dcm`` whose TEXT items hold the
report; read by the drafts inbox's machinery, :class:`FinalsReader`), it is parsed with
the same draft parser as the drafts (``drafts.parser``) and compared with the study's latest
``audit.json``. Per positive label one :class:`~dicom_agent.state.AgreementRow` records:

- the final's verdict: ``present`` is positive; ``absent`` or not mentioned is negative (a
  final names what is there); ``uncertain`` records nothing for that label;
- whether the model reported the label (None when its grounding was not ok);
- whether the draft stated it present (None without a parsed draft);
- the flag kinds the audit raised on the label.

A final that arrives before its study is audited waits (``pending``) and is compared once the
result exists; an amended final replaces the study's rows. :func:`window_summary` turns the
newest ``monitoring.window_cases`` rows per profile and label into running sensitivity and
specificity (model and draft) and the share of flags the finals confirmed, each with a 95 %
Wilson interval: ``/metrics`` exports them and the results browser shows them, so a site sees
drift (a new scanner, a new protocol) early.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.eval.stats import BinaryCounts, Rate
from cxr_auditor.labels import POSITIVE_LABELS
from cxr_auditor.schema import (
    AuditResult,
    DraftResult,
    DraftState,
    DraftStatus,
    FlagKind,
    GroundingState,
)
from dicom_agent.config import AgentSettings
from dicom_agent.errors import OutputError
from dicom_agent.inbox import DraftReader, KeyKind, Reject, _Rejected, is_study_uid
from dicom_agent.observe import Event, Metrics, event, study_ref
from dicom_agent.outputs.layout import SIDECAR_NAME, read_result, study_dir
from dicom_agent.state import AgreementRow, DraftOutcome, FinalState, StateDB

log = logging.getLogger(__name__)

__all__ = [
    "FinalsReader",
    "Monitor",
    "WindowSummary",
    "agreement_rows",
    "grounding_profile",
    "sr_report_text",
    "window_summary",
]

#: Flag kinds a final report can confirm, and the final verdict that confirms each.
CONFIRMED_BY: dict[str, bool] = {
    FlagKind.MISSING.value: True,
    FlagKind.URGENT.value: True,
    FlagKind.UNSUPPORTED.value: False,
}


class FinalsReader(DraftReader):
    """The finals folder, read exactly like the drafts folder (stability, rejects, moves)."""

    noun = "final report"
    accepted_event = Event.FINAL_ACCEPTED
    duplicate_event = Event.FINAL_DUPLICATE
    rejected_event = Event.FINAL_REJECTED
    retry_event = Event.FINAL_RETRY

    def __init__(
        self, settings: AgentSettings, db: StateDB, metrics: Metrics | None = None
    ) -> None:
        super().__init__(settings, db, metrics)
        self.folder = settings.paths.finals

    def _store(
        self, key: str, kind: str, file_name: str, sha: str, text: str, author: str | None,
        now: float,
    ) -> tuple[DraftOutcome, int]:
        return self.db.record_final(
            key=key, key_kind=kind, file_name=file_name, sha256=sha, text=text, now=now
        )

    def _store_file_name(self, row_id: int, file_name: str) -> None:
        self.db.set_final_file_name(row_id, file_name)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.finals.labels(outcome).inc()

    def _parse(self, path: Path, data: bytes) -> tuple[str, str, str, str | None]:
        """A ``.dcm`` file is a report exported as a DICOM SR; the rest is read like a draft
        (an empty or oversized file is refused the same way, ``data`` then being empty)."""
        if path.suffix.lower() != ".dcm" or not data:
            return super()._parse(path, data)
        uid, text = sr_report_text(data)
        return uid, KeyKind.STUDY_UID, text, None


def _text_items(items: Sequence[Dataset]) -> Iterator[str]:
    """TEXT values of a content tree, depth first in document order (PS3.3 C.17.3)."""
    for item in items:
        if item.get("ValueType") == "TEXT" and str(item.get("TextValue", "")).strip():
            yield str(item.TextValue)
        yield from _text_items(item.get("ContentSequence", []))


def sr_report_text(data: bytes) -> tuple[str, str]:
    """``(Study Instance UID, report text)`` of a DICOM SR file (PS3.10): the TEXT content
    items (Text Value (0040,A160)) of its content tree, joined by line breaks.

    Raises:
        _Rejected: not a readable DICOM file, not an SR (Modality (0008,0060) ``SR``), no
            valid Study Instance UID, or no text; the reason never quotes the file's content.
    """
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, ValueError, OSError, EOFError, RecursionError):
        raise _Rejected(Reject.UNSUPPORTED_TYPE, "a .dcm file must be a DICOM SR (PS3.10)") from None
    if ds.get("Modality") != "SR":
        raise _Rejected(Reject.UNSUPPORTED_TYPE, "a .dcm final report must be an SR (Modality SR)")
    uid = str(ds.get("StudyInstanceUID", "")).strip()
    if not is_study_uid(uid):
        raise _Rejected(Reject.BAD_NAME, "the SR has no valid Study Instance UID")
    try:
        text = "\n".join(_text_items(ds.get("ContentSequence", [])))
    except RecursionError:  # a content tree nested deeper than the stack, within max_bytes
        raise _Rejected(Reject.UNSUPPORTED_TYPE, "the SR content tree is nested too deeply") from None
    if not text.strip():
        raise _Rejected(Reject.EMPTY, "the SR holds no TEXT content item")
    return uid, text


def grounding_profile(result: AuditResult) -> str:
    """The profile that grounded the result (``unknown`` for a result without one)."""
    return next((m.profile for m in result.models if m.task == "grounding"), "unknown")


def _draft_present(draft: DraftResult) -> dict[str, bool] | None:
    if draft.state is not DraftState.PARSED:
        return None
    out = {lab.value: False for lab in POSITIVE_LABELS}
    for finding in draft.findings:
        if finding.status is DraftStatus.PRESENT:
            out[finding.label.value] = True
    return out


def agreement_rows(
    result: AuditResult, final: DraftResult, *, final_id: int, study_uid: str, now: float
) -> list[AgreementRow]:
    """One row per positive label the final gives a verdict on (see the module docstring)."""
    statuses: dict[str, DraftStatus] = {}
    for finding in final.findings:
        # a label stated present anywhere in the final is present; uncertain beats absent
        old = statuses.get(finding.label.value)
        if old is not DraftStatus.PRESENT and (
            old is None or finding.status is not DraftStatus.ABSENT
        ):
            statuses[finding.label.value] = finding.status
    model = (
        {f.label.value for f in result.grounding.findings}
        if result.grounding.state is GroundingState.OK
        else None
    )
    draft = _draft_present(result.draft)
    flags: dict[str, list[str]] = defaultdict(list)
    for flag in result.flags:
        flags[flag.label.value].append(flag.kind.value)
    rows = []
    for label in (lab.value for lab in POSITIVE_LABELS):
        status = statuses.get(label, DraftStatus.ABSENT)
        if status is DraftStatus.UNCERTAIN:
            continue
        rows.append(
            AgreementRow(
                final_id=final_id,
                study_instance_uid=study_uid,
                result_version=result.result_version,
                profile=grounding_profile(result),
                label=label,
                final_present=status is DraftStatus.PRESENT,
                model_present=None if model is None else label in model,
                draft_present=None if draft is None else draft[label],
                flags=tuple(sorted(set(flags.get(label, [])))),
                recorded_at=now,
            )
        )
    return rows


# -- the running figures -----------------------------------------------------------------------


@dataclass
class WindowSummary:
    """Running agreement over the sliding window, per (profile, label) and (profile, flag kind)."""

    window_cases: int
    model: dict[tuple[str, str], BinaryCounts] = field(default_factory=dict)
    draft: dict[tuple[str, str], BinaryCounts] = field(default_factory=dict)
    cases: dict[tuple[str, str], int] = field(default_factory=dict)
    flags: dict[tuple[str, str], Rate] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        labels = []
        for key in sorted(self.cases):
            model = self.model.get(key, BinaryCounts())
            draft = self.draft.get(key, BinaryCounts())
            labels.append({
                "profile": key[0],
                "label": key[1],
                "cases": self.cases[key],
                "model_sensitivity": model.recall.as_dict(),
                "model_specificity": model.specificity.as_dict(),
                "draft_sensitivity": draft.recall.as_dict(),
                "draft_specificity": draft.specificity.as_dict(),
            })
        flags = [
            {"profile": p, "kind": k, "confirmed": rate.as_dict()}
            for (p, k), rate in sorted(self.flags.items())
        ]
        return {"window_cases": self.window_cases, "labels": labels, "flags": flags}


def window_summary(rows: list[AgreementRow], window_cases: int) -> WindowSummary:
    """Pool agreement rows (already cut to the window) into running figures."""
    out = WindowSummary(window_cases)
    confirmed: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        key = (row.profile, row.label)
        out.cases[key] = out.cases.get(key, 0) + 1
        if row.model_present is not None:
            out.model.setdefault(key, BinaryCounts()).add(row.final_present, row.model_present)
        if row.draft_present is not None:
            out.draft.setdefault(key, BinaryCounts()).add(row.final_present, row.draft_present)
        for kind in row.flags:
            if kind in CONFIRMED_BY:
                tally = confirmed[(row.profile, kind)]
                tally[0] += row.final_present is CONFIRMED_BY[kind]
                tally[1] += 1
    out.flags = {key: Rate(ok, n) for key, (ok, n) in confirmed.items()}
    return out


# -- the loop ------------------------------------------------------------------------------------


class Monitor:
    """Reads the finals folder and compares pending finals (one scheduler job: :meth:`tick`)."""

    def __init__(
        self,
        settings: AgentSettings,
        db: StateDB,
        metrics: Metrics | None = None,
        parser: DraftParser | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.reader = FinalsReader(settings, db, metrics)
        self._parser = parser

    def _draft_parser(self) -> DraftParser:
        """The agent's draft parser, built on first use (an LLM parser is not loaded twice
        at start-up for a site that never drops a final)."""
        if self._parser is None:
            from cxr_auditor.drafts import get_parser

            self._parser = get_parser(
                self.settings.drafts.parser, profiles_dir=self.settings.paths.profiles
            )
        return self._parser

    def tick(self, now: float | None = None) -> int:
        """Poll the folder, compare what can be compared, refresh the gauges; returns the
        number of finals compared."""
        now = time.time() if now is None else now
        self.reader.poll(now)
        compared = self.compare_pending(now)
        if compared:
            self.publish()
        return compared

    def compare_pending(self, now: float) -> int:
        compared = 0
        for final in self.db.finals(FinalState.PENDING):
            studies = self.db.studies_for_key(final.key)
            if len(studies) != 1:  # no study yet, or an accession number two studies hold
                continue
            (uid,) = studies
            sidecar = study_dir(self.settings, uid) / SIDECAR_NAME
            if not sidecar.exists():
                continue  # not audited yet: compared on a later tick
            try:
                result = read_result(sidecar)
            except OutputError:  # one unreadable result must not hold up the other finals
                log.warning("final report not compared: the study's result is unreadable",
                            extra=event(study=study_ref(uid), reason="result_unreadable"))
                continue
            (parsed,) = self._draft_parser().parse_many([final.text])
            rows = agreement_rows(result, parsed, final_id=final.id, study_uid=uid, now=now)
            self.db.record_agreements(final.id, uid, rows, now)
            compared += 1
            log.info(
                "final report compared with result version %d (%d labels)",
                result.result_version, len(rows),
                extra=event(event=Event.FINAL_COMPARED, study=study_ref(uid),
                            result_version=result.result_version, count=len(rows)),
            )
        return compared

    def summary(self) -> WindowSummary:
        window = self.settings.monitoring.window_cases
        return window_summary(self.db.agreement_window(window), window)

    def publish(self) -> WindowSummary:
        """Set the monitoring gauges from the current window (also called at start-up)."""
        summary = self.summary()
        m = self.metrics
        if m is None:
            return summary
        for (profile, label), n in summary.cases.items():
            m.monitor_cases.labels(profile, label).set(n)
            for source, counts in (("model", summary.model), ("draft", summary.draft)):
                c = counts.get((profile, label))
                if c is None:
                    continue
                if c.recall.value is not None:
                    m.monitor_sensitivity.labels(profile, label, source).set(c.recall.value)
                if c.specificity.value is not None:
                    m.monitor_specificity.labels(profile, label, source).set(c.specificity.value)
        for (profile, kind), rate in summary.flags.items():
            if rate.value is not None:
                m.monitor_flag_confirmed.labels(profile, kind).set(rate.value)
        return summary
