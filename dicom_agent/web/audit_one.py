"""Audit one image: upload a DICOM or PNG/JPEG (or pick a stored instance), paste a draft, and
see what the agent would say: the overlay, the verdict, the flags and findings, the raw JSON.

It runs the agent's own model (the loaded runner from the agent's model registry) on the image
prepared by :mod:`dicom_agent.prepare`, the path of the worker and ``cxr-agent audit`` (routing,
decoding, windowing, letterboxing), one request at a time.
Uploads live in a temporary folder that is removed after the audit, unless
``web.keep_uploads`` is on: then the file and its ``audit.json`` stay in ``web.uploads``.
Three built-in examples (a clean normal, a missed nodule, an unsupported claim) are synthetic
pictures drawn here with a draft each; what is flagged depends on the profile's model.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.render import render_overlay
from cxr_auditor.schema import FLAG_ORDER, AuditResult, StudyKeys
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import AgentError
from dicom_agent.files import atomic_write_text
from dicom_agent.prepare import Draft, instances_from_files, prepare_study
from dicom_agent.state import InstanceRow
from dicom_agent.web.context import AgentView, agent_of, render
from dicom_agent.web.study import draft_segments

NAV: tuple[str, str] | None = ("Audit one image", "/audit")

#: One audit at a time from the browser: the model is shared with the worker.
_RUN_LOCK = threading.Lock()
_CHUNK = 1 << 20
_PICKABLE_STUDIES = 10


@dataclass(frozen=True)
class Example:
    """A built-in case: a synthetic picture (dark or bright, with or without a nodule) and a
    draft."""

    name: str
    title: str
    draft: str
    bright: bool
    nodule: bool


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example("clean-normal", "Clean normal",
                "Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
                bright=False, nodule=False),
        Example("missed-nodule", "Missed nodule",
                "The lungs are clear. No pleural effusion, pneumothorax or focal consolidation.",
                bright=True, nodule=True),
        Example("unsupported-claim", "Unsupported claim",
                "Large right pleural effusion. No pneumothorax.", bright=False, nodule=False),
    )
}


def example_picture(example: Example, size: int = 512) -> Image.Image:
    """A synthetic frontal chest picture: two lung fields, a mediastinum, optionally a nodule.

    Not a radiograph; a stand-in so the page can be tried without data. ``bright`` draws a dense
    (over-exposed looking) chest.
    """
    base = 170 if example.bright else 45
    picture = Image.new("L", (size, size), base)
    draw = ImageDraw.Draw(picture)
    lung = base - 35 if example.bright else base - 25
    draw.ellipse((size * 0.12, size * 0.15, size * 0.46, size * 0.88), fill=lung)
    draw.ellipse((size * 0.54, size * 0.15, size * 0.88, size * 0.88), fill=lung)
    draw.rectangle((size * 0.45, size * 0.1, size * 0.55, size * 0.9), fill=base + 40)
    if example.nodule:  # in the image's left upper zone: the patient's right lung on a PA view
        r = size * 0.045
        cx, cy = size * 0.3, size * 0.35
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=min(255, base + 70))
    return picture.filter(ImageFilter.GaussianBlur(size / 200))


def _pickable(agent: AgentView) -> list[dict[str, str]]:
    """Stored instances of the newest studies, for the "pick a stored image" list."""
    out = []
    for study in agent.db.studies_page(limit=_PICKABLE_STUDIES):
        for inst in agent.db.instances_of_study(study.study_instance_uid):
            name = study.accession_number or study.study_instance_uid[-12:]
            out.append({"sop": inst.sop_instance_uid,
                        "label": f"{name} {inst.modality or ''} {inst.view_position or ''}".strip()})
    return out


def _form_context(agent: AgentView, **extra: Any) -> dict[str, Any]:
    return {"examples": list(EXAMPLES.values()), "pickable": _pickable(agent),
            "profile": agent.settings.grounding.profile,
            "keep_uploads": agent.settings.web.keep_uploads, **extra}


def audit_form(request: Request) -> Response:
    return render(request, "audit.html", **_form_context(agent_of(request), draft=""))


async def _save_upload(upload: UploadFile, folder: Path, limit: int) -> Path:
    """Stream an upload to ``folder`` under a neutral name, refusing more than ``limit`` bytes."""
    suffix = Path(upload.filename or "").suffix.lower()
    path = folder / f"upload{suffix if suffix in {'.dcm', '.png', '.jpg', '.jpeg'} else ''}"
    size = 0
    with path.open("wb") as fh:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise AgentError(f"upload larger than web.max_upload_bytes ({limit} bytes)")
            fh.write(chunk)
    if size == 0:
        raise AgentError("the uploaded file is empty")
    return path


async def audit_run(request: Request) -> Response:
    agent = agent_of(request)
    web = agent.settings.web
    async with request.form(max_files=1, max_part_size=web.max_upload_bytes) as form:
        draft = str(form.get("draft") or "")
        example = EXAMPLES.get(str(form.get("example") or ""))
        picked = str(form.get("instance") or "")
        upload = form.get("image")
        work = Path(tempfile.mkdtemp(prefix="cxr-web-"))
        try:
            source: Path | InstanceRow
            if example is not None:
                source = work / f"{example.name}.png"
                example_picture(example).save(source)
                draft = example.draft
            elif isinstance(upload, UploadFile) and upload.filename:
                source = await _save_upload(upload, work, web.max_upload_bytes)
            elif picked:
                instance = agent.db.instance(picked) if is_valid_uid(picked) else None
                if instance is None or not Path(instance.path).is_file():
                    raise AgentError("that stored instance is gone")
                source = instance
            else:
                raise AgentError("choose an image: upload one, pick a stored one, or an example")
            outcome = await run_in_threadpool(_audit, agent, source, draft)
            if web.keep_uploads:
                _keep(web.uploads, Path(source.path) if isinstance(source, InstanceRow)
                      else source, outcome["result"])
        except AgentError as exc:
            context = _form_context(agent, draft=draft, error=str(exc))
            return render(request, "audit.html", status_code=400, **context)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return render(request, "audit.html", **_form_context(agent, draft=draft, example=example,
                                                         **outcome))


def _audit(agent: AgentView, source: Path | InstanceRow, draft: str) -> dict[str, Any]:
    """Prepare ``source`` as the worker and ``cxr-agent audit`` do (a stored instance from its
    state DB row, a file as ``audit`` reads it), run the agent's model, draw the overlay."""
    settings = agent.settings
    text = draft if draft.strip() else None
    sha = hashlib.sha256(draft.encode()).hexdigest() if text else None
    if isinstance(source, InstanceRow):
        rows, pictures, study = [source], [], StudyKeys()
    else:
        rows, pictures, study = instances_from_files([source])
    prepared = prepare_study(rows, settings, study=study, draft=Draft(text, None, sha),
                             pictures=pictures)
    if not prepared.item.images:
        reasons = ", ".join(s.get("reason", "?") for s in prepared.item.skipped_images)
        raise AgentError(f"nothing to audit: the image was skipped ({reasons})")
    runner = agent.models.get(prepared.profile)
    if runner is None:
        state = agent.models.status().get(prepared.profile, {})
        reason = f": {str(state['reason']).splitlines()[0]}" if state.get("reason") else ""
        raise AgentError(f"the model of profile {prepared.profile} is"
                         f" {state.get('state', 'not loaded')}{reason}")
    started = time.perf_counter()
    try:
        with _RUN_LOCK:
            (result,) = runner.audit_batch([prepared.item])
    except CxrAuditError as exc:
        raise AgentError(f"audit failed: {str(exc).splitlines()[0]}") from exc
    took = time.perf_counter() - started
    overlay = io.BytesIO()
    index, display = next(iter(prepared.display.items()))
    render_overlay(display.pixels, result, index).save(overlay, format="PNG", compress_level=1)
    return {
        "result": result,
        "seconds": took,
        "overlay": base64.b64encode(overlay.getvalue()).decode("ascii"),
        "verdict": verdict(result),
        "flags": sorted(result.flags, key=lambda f: FLAG_ORDER.index(f.kind)),
        "segments": draft_segments(draft, result) if text else [],
        "raw_json": result.to_json(),
    }


def verdict(result: AuditResult) -> str:
    """One line: what a reader should take from the audit."""
    if result.grounding.state.value != "ok":
        return f"Image analysis {result.grounding.state.value}: no findings, no flags."
    if not result.flags:
        return "No flags: the draft agrees with the image findings."
    kinds = sorted({f.kind for f in result.flags}, key=FLAG_ORDER.index)
    return f"{len(result.flags)} flag(s): " + ", ".join(k.value.upper() for k in kinds) + "."


def _keep(folder: Path, source: Path, result: AuditResult) -> None:
    """``web.keep_uploads``: the input and its result in ``<uploads>/<time>-<n>/``."""
    target = folder / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:
        candidate = target.with_name(f"{target.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
    shutil.copyfile(source, candidate / source.name)
    atomic_write_text(candidate / "audit.json", result.to_json() + "\n")


ROUTES = [
    Route("/audit", audit_form, methods=["GET"]),
    Route("/audit", audit_run, methods=["POST"]),
]
