"""Replay: audit spooled studies again with another profile (or prompt) into a folder apart.

``cxr-agent replay --profile NAME`` takes the studies the agent has audited (or the ones named
with ``--studies``), prepares each exactly as the worker does (:mod:`dicom_agent.prepare`:
routing, decoding, windowing, the study's current draft), runs them in batches through the
runner of ``NAME`` and writes ``<out>/<StudyInstanceUID>/audit.json`` (and ``v1/audit.json``)
plus ``<out>/replay.json`` (what was run, when, on how many studies). Nothing of the agent's own
results, state or forwarding is touched, so a replay can run beside ``serve``; the study is
routed as if ``grounding.profile`` were ``NAME``. ``cxr-agent diff A B`` then compares two
result folders (:mod:`cxr_auditor.eval.diff`).

A study whose images are gone from the spool (housekeeping) or cannot be prepared is reported
as failed, the others go on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.eval.diff import DiffSummary
from cxr_auditor.profiles import Profile
from cxr_auditor.schema import DISCLAIMER, AuditResult
from dicom_agent.config import AgentSettings
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import OutputError
from dicom_agent.observe import study_ref
from dicom_agent.outputs.layout import SIDECAR_NAME, read_result
from dicom_agent.outputs.sidecar import write_sidecar
from dicom_agent.prepare import (
    Draft,
    PreparedStudy,
    configured_for,
    prepare_study,
    profile_routes,
    stored_study_keys,
)
from dicom_agent.registry import AuditRunner
from dicom_agent.routing import ProfileRoutes
from dicom_agent.state import StateDB

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "ReplayReport", "diff_folders", "load_results", "replay_studies"]

#: What a replay folder holds beside the per-study results.
MANIFEST_NAME = "replay.json"


@dataclass
class ReplayReport:
    """Outcome of one replay run."""

    profile: str
    out: Path
    replayed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # study UID -> reason (no PHI)
    flags: Counter[str] = field(default_factory=Counter)

    def summary(self) -> list[tuple[str, object]]:
        rows: list[tuple[str, object]] = [
            ("profile", self.profile),
            ("studies replayed", len(self.replayed)),
            ("studies failed", len(self.failed)),
        ]
        rows += [(f"flags {kind}", n) for kind, n in sorted(self.flags.items())]
        return rows


def _prepare(
    db: StateDB, settings: AgentSettings, uid: str, profile: str,
    routes: dict[str, ProfileRoutes],
) -> PreparedStudy:
    if not is_valid_uid(uid):  # PS3.5 9.1: digits and dots, so it is a safe folder name
        raise ValueError("not a DICOM UID")
    study = db.study(uid)
    if study is None:
        raise LookupError("not in the state database")
    instances = db.instances_of_study(uid)
    missing = [row for row in instances if not Path(row.path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(instances)} instances gone from the spool")
    draft = db.current_draft(uid)
    return prepare_study(
        instances,
        settings,
        study=stored_study_keys(uid, study),
        routes=routes,
        fallback_profile=profile,
        draft=Draft.of(draft),
        log_fields={"study": study_ref(uid)},
    )


def replay_studies(
    settings: AgentSettings,
    db: StateDB,
    runner: AuditRunner,
    profile: Profile,
    out: Path,
    studies: Sequence[str],
    *,
    batch_size: int = 8,
    advance: Callable[[int], None] = lambda n: None,
) -> ReplayReport:
    """Replay ``studies`` (Study Instance UIDs; the command's default is every audited study)
    with ``runner``, the runner of ``profile``, into ``out``. ``advance`` is told how many
    studies each batch finished.
    """
    replay_settings = configured_for(settings, profile)
    routes = profile_routes(replay_settings)  # read once per run, as the worker does per batch
    uids = list(studies)
    report = ReplayReport(profile.name, out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for start in range(0, len(uids), batch_size):
        batch: list[tuple[str, PreparedStudy]] = []
        for uid in uids[start : start + batch_size]:
            try:
                prepared = _prepare(db, replay_settings, uid, profile.name, routes)
                if prepared.profile != profile.name:  # an XA run when replaying a CXR profile
                    raise LookupError(f"routed to profile {prepared.profile}")
                batch.append((uid, prepared))
            except Exception as exc:  # one study that cannot be prepared must not stop the run
                report.failed[uid] = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("replay: study not prepared (%s)", type(exc).__name__,
                            extra={"study": study_ref(uid)})
        if batch:
            try:
                results = runner.audit_batch([p.item for _, p in batch])
            except CxrAuditError as exc:  # the model failed this batch: the next one may pass
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                report.failed.update({uid: reason for uid, _ in batch})
                log.warning("replay: a batch of %d failed on the model (%s)", len(batch),
                            type(exc).__name__)
                results = []
            for (uid, _), result in zip(batch, results, strict=False):
                write_sidecar(out / uid, result)
                report.replayed.append(uid)
                report.flags.update(f.kind.value for f in result.flags)
        advance(min(batch_size, len(uids) - start))
    manifest = {
        "disclaimer": DISCLAIMER,
        "profile": profile.name,
        "prompt": profile.prompt,
        "parser": settings.drafts.parser,
        "started_at": started,
        "finished_at": time.time(),
        "studies": len(report.replayed),
        "failed": report.failed,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return report


# -- diff ----------------------------------------------------------------------------------------


def load_results(path: Path) -> dict[str, AuditResult]:
    """The latest results under ``path``: a results folder (the agent's ``paths.out`` or a
    replay folder, one ``<study>/audit.json`` each) or a single ``audit.json`` (key ``-``).

    Raises:
        OutputError: nothing readable there.
    """
    if path.is_file():
        return {"-": read_result(path)}
    if not path.is_dir():
        raise OutputError(f"{path}: no such folder or file")
    out: dict[str, AuditResult] = {}
    for sidecar in sorted(path.glob(f"*/{SIDECAR_NAME}")):
        out[sidecar.parent.name] = read_result(sidecar)
    if not out:
        raise OutputError(f"{path}: no <study>/{SIDECAR_NAME} in it")
    return out


def diff_folders(a: Path, b: Path) -> DiffSummary:
    """Compare the results of two folders (or two ``audit.json`` files) study by study."""
    left, right = load_results(a), load_results(b)
    summary = DiffSummary(
        only_a=sorted(set(left) - set(right)), only_b=sorted(set(right) - set(left))
    )
    for key in sorted(set(left) & set(right)):
        summary.add(key, left[key], right[key])
    return summary

