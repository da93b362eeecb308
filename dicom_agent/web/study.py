"""A study's page: overlays with their legend, the draft with its parsed spans, the flags, the
timeline with per-stage timings, every result version, links to the JSON and DICOM objects, and
the actions re-audit, resend and retry a dead job.

The actions call what the CLI commands call: ``reaudit`` queues through
:func:`dicom_agent.scheduler.reaudit_study`, ``resend`` queues the latest version's validated objects
through :func:`dicom_agent.forward.queue_resend` (as ``cxr-agent resend --queue-only``; the
running agent's scheduler sends them), a dead forward job is re-queued by
:meth:`StateDB.retry_dead_forward_jobs` (``cxr-agent forward retry``) and a dead audit job by
queueing a new audit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydicom
from pydicom.errors import InvalidDicomError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from cxr_auditor.render import COLOURS, KEY_NAMES, BoxStyle
from cxr_auditor.schema import FLAG_ORDER, AuditResult
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import AgentError, OutputError, StateError
from dicom_agent.forward import queue_resend
from dicom_agent.outputs.layout import (
    SIDECAR_NAME,
    object_file_name,
    read_result,
    study_dir,
    version_dir,
    version_numbers,
)
from dicom_agent.scheduler import reaudit_study
from dicom_agent.state import InstanceRow, JobKind, JobRow, JobState, StudyRow
from dicom_agent.web.context import AgentView, agent_of, render

NAV: tuple[str, str] | None = None



@dataclass(frozen=True)
class Segment:
    """A piece of the draft text; ``tags`` are the ``(label, status)`` pairs of the parser
    statements that cover exactly this span (one sentence can state several labels)."""

    text: str
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def status(self) -> str | None:
        return self.tags[0][1] if self.tags else None

    @property
    def title(self) -> str:
        return ", ".join(f"{label} ({status})" for label, status in self.tags)


def draft_segments(text: str, result: AuditResult) -> list[Segment]:
    """The draft split at the parsed spans (findings and unmapped mentions), in text order.

    Statements with the same span are shown as one highlight with all their labels; a span that
    overlaps an earlier one otherwise is left out, so the text is shown once, verbatim.
    """
    spans: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for f in result.draft.findings:
        spans.setdefault((f.start, f.end), []).append((f.label.value, f.status.value))
    for u in result.draft.unmapped_mentions:
        spans.setdefault((u.start, u.end), []).append((f"unmapped: {u.term}", u.status.value))
    out: list[Segment] = []
    pos = 0
    for (start, end), tags in sorted(spans.items()):
        if start < pos or end > len(text) or end <= start:
            continue
        if start > pos:
            out.append(Segment(text[pos:start]))
        out.append(Segment(text[start:end], tuple(tags)))
        pos = end
    if pos < len(text):
        out.append(Segment(text[pos:]))
    return out


def versions(folder: Path) -> list[int]:
    """Result versions with a sidecar in the study folder, newest first."""
    return [
        n for n in reversed(version_numbers(folder))
        if (version_dir(folder, n) / SIDECAR_NAME).is_file()
    ]


def _study_uid(request: Request) -> str:
    uid = request.path_params["uid"]
    if not is_valid_uid(uid):  # PS3.5 9.1; also keeps file paths inside paths.out
        raise HTTPException(404, "not a study UID")
    return str(uid)


def _patient_identity(
    agent: AgentView, instances: list[InstanceRow]
) -> dict[str, str] | None:
    """Patient's Name and ID from the first readable instance, only when the config allows."""
    if not agent.settings.web.show_patient_identity:
        return None
    for instance in instances:
        try:
            ds = pydicom.dcmread(
                instance.path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"]
            )
        except (OSError, InvalidDicomError):
            continue
        return {"name": str(ds.get("PatientName", "")), "id": str(ds.get("PatientID", ""))}
    return None


def _timeline(
    agent: AgentView, study: StudyRow | None, jobs: list[JobRow]
) -> list[dict[str, Any]]:
    """State changes in time order, each with the seconds since the one before."""
    events: list[dict[str, Any]] = []
    if study is not None:
        events.append({"at": study.first_instance_at, "what": "first instance received"})
        if study.last_instance_at != study.first_instance_at:
            events.append({"at": study.last_instance_at, "what": "last instance received"})
        if study.settled_at:
            events.append({"at": study.settled_at, "what": "study settled"})
    for draft in agent.db.drafts_of_study(study.study_instance_uid) if study else []:
        events.append({"at": draft.received_at, "what": f"draft {draft.id} received",
                       "detail": f"by {draft.key_kind}"})
        events.append({"at": draft.updated_at, "what": f"draft {draft.id} {draft.state}"})
    for job in jobs:
        reason = _reason(job)
        version = f" for version {job.result_version}" if job.result_version else ""
        events.append({"at": job.created_at, "what": f"{job.kind} job {job.id} queued{version}",
                       "detail": reason})
        took = job.updated_at - job.created_at
        detail = f"after {job.attempts} attempt(s), {took:.1f} s after queueing"
        if job.last_error and job.state != JobState.DONE.value:
            detail += f": {job.last_error.splitlines()[0][:300]}"
        events.append({"at": job.updated_at, "what": f"{job.kind} job {job.id} {job.state}",
                       "detail": detail, "job": job})
    events.sort(key=lambda e: e["at"])
    for before, after in zip(events, events[1:], strict=False):
        after["delta"] = after["at"] - before["at"]
    return events


def _reason(job: JobRow) -> str:
    try:
        return str(json.loads(job.payload or "{}").get("reason", ""))
    except ValueError:
        return ""


def study_page(request: Request) -> Response:
    agent = agent_of(request)
    uid = _study_uid(request)
    study = agent.db.study(uid)
    folder = study_dir(agent.settings, uid)
    all_versions = versions(folder)
    if study is None and not all_versions:
        raise HTTPException(404, "unknown study")
    try:
        chosen = int(request.query_params.get("v") or (all_versions[0] if all_versions else 0))
    except ValueError:
        chosen = all_versions[0] if all_versions else 0
    result: AuditResult | None = None
    if chosen:
        try:
            result = read_result(version_dir(folder, chosen) / SIDECAR_NAME)
        except OutputError:
            result = None
    jobs = agent.db.jobs_of_study(uid)
    instances = agent.db.instances_of_study(uid)
    segments: list[Segment] = []
    draft_text = None
    if result is not None:
        job = next((j for j in jobs if j.kind == JobKind.AUDIT.value
                    and j.result_version == result.result_version), None)
        draft = agent.db.draft(job.draft_id) if job and job.draft_id else None
        if draft is not None:
            draft_text = draft.text
            segments = draft_segments(draft.text, result)
    files = _files(folder, result)
    overlays = [
        f"v{chosen}/overlay-{ref.index}.png" for ref in (result.inputs.images if result else [])
        if (version_dir(folder, chosen) / f"overlay-{ref.index}.png").is_file()
    ]
    flags = sorted(result.flags, key=lambda f: FLAG_ORDER.index(f.kind)) if result else []
    return render(
        request, "study.html",
        uid=uid, quid=quote(uid), study=study, result=result, versions=all_versions,
        chosen=chosen, segments=segments, draft_text=draft_text, flags=flags, files=files,
        overlays=overlays, timeline=_timeline(agent, study, jobs),
        legend=[(f"rgb{COLOURS[s]}", KEY_NAMES[s]) for s in BoxStyle],
        instances=instances,
        dead_jobs=[j for j in jobs if j.state == JobState.DEAD.value],
        identity=_patient_identity(agent, instances),
        message=request.query_params.get("msg"),
        can_resend=any(d.research for d in agent.settings.forward.destinations),
    )


def _files(folder: Path, result: AuditResult | None) -> list[tuple[str, str]]:
    """(label, path under the study folder) of the version's JSON and DICOM objects."""
    if result is None:
        return []
    version = f"v{result.result_version}"
    files = [("audit.json", f"{version}/{SIDECAR_NAME}")]
    for kind in sorted(result.outputs, key=lambda k: (k != "sr", k)):
        name = object_file_name(kind)
        if (folder / version / name).is_file():
            files.append((f"{kind} ({name})", f"{version}/{name}"))
    return files


_MEDIA = {".json": "application/json", ".png": "image/png", ".dcm": "application/dicom"}


def study_file(request: Request) -> Response:
    """A file of the study's ``out/`` folder (JSON, overlay PNG, DICOM object)."""
    agent = agent_of(request)
    uid = _study_uid(request)
    base = study_dir(agent.settings, uid).resolve()
    path = (base / request.path_params["name"]).resolve()
    if not path.is_relative_to(base) or not path.is_file() or path.suffix not in _MEDIA:
        raise HTTPException(404, "no such file")
    download = path.suffix == ".dcm"
    return FileResponse(path, media_type=_MEDIA[path.suffix],
                        filename=path.name if download else None)


def source_instance(request: Request) -> Response:
    """A stored source instance of the study (the spooled DICOM file, PS3.10)."""
    agent = agent_of(request)
    uid = _study_uid(request)
    sop = request.path_params["sop"]
    instance = agent.db.instance(sop) if is_valid_uid(sop) else None
    if instance is None or instance.study_instance_uid != uid or not Path(instance.path).is_file():
        raise HTTPException(404, "no such instance")
    return FileResponse(instance.path, media_type="application/dicom", filename=f"{sop}.dcm")


def _back(uid: str, message: str) -> RedirectResponse:
    return RedirectResponse(f"/studies/{quote(uid)}?msg={quote(message)}", 303)


def _reaudit(agent: AgentView, uid: str) -> str:
    """Queue a new audit version as ``cxr-agent reaudit`` does; the message to show."""
    if agent.db.study(uid) is None:
        return "unknown study: no instance of it was received"
    try:
        job = reaudit_study(agent.db, uid, time.time())
    except StateError as exc:
        return str(exc)
    return f"queued audit job {job.id} (result version {job.result_version})"


def reaudit(request: Request) -> Response:
    uid = _study_uid(request)
    return _back(uid, _reaudit(agent_of(request), uid))


def resend(request: Request) -> Response:
    """Queue the latest version's validated objects for every research destination."""
    agent = agent_of(request)
    uid = _study_uid(request)
    try:
        queued = queue_resend(agent.db, agent.settings, uid)
    except AgentError as exc:
        return _back(uid, str(exc))
    return _back(uid, f"queued {len(queued.files)} objects of version {queued.result_version}"
                      f" for {len(queued.job_ids)} destination(s)")


def retry_job(request: Request) -> Response:
    """Retry a dead job: a dead audit is audited again (a new result version), a dead forward
    job is re-queued as ``cxr-agent forward retry`` does."""
    agent = agent_of(request)
    try:
        job = agent.db.job(int(request.path_params["job_id"]))
    except ValueError:
        job = None
    if job is None or job.state != JobState.DEAD.value:
        raise HTTPException(404, "no such dead job")
    if job.kind == JobKind.AUDIT.value:
        message = _reaudit(agent, job.study_instance_uid)
    else:  # as `cxr-agent forward retry ID`: due now, fresh attempt budget
        try:
            agent.db.retry_dead_forward_jobs([job.id], time.time())
            message = f"re-queued forward job {job.id}"
        except StateError as exc:
            message = str(exc)
    return _back(job.study_instance_uid, message)


ROUTES = [
    Route("/studies/{uid}", study_page),
    Route("/studies/{uid}/files/{name:path}", study_file),
    Route("/studies/{uid}/instances/{sop}", source_instance),
    Route("/studies/{uid}/reaudit", reaudit, methods=["POST"]),
    Route("/studies/{uid}/resend", resend, methods=["POST"]),
    Route("/jobs/{job_id:int}/retry", retry_job, methods=["POST"]),
]
