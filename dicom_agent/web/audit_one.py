"""Audit one image: upload a DICOM or PNG/JPEG (or pick a stored instance), paste a draft, and
see what the agent would say: the overlay, the verdict, the flags and findings, the raw JSON.

It runs the agent's own model (the loaded runner of ``grounding.profile`` from the agent's model
registry) on the image prepared as ``cxr-agent audit`` prepares it, one request at a time.
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

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cxr_auditor.errors import CxrAuditError
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.pipeline import AuditItem
from cxr_auditor.render import render_overlay
from cxr_auditor.schema import AuditResult, ImageRef, StudyKeys
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import AgentError
from dicom_agent.files import atomic_write_text
from dicom_agent.pixels import (
    DisplayImage,
    patient_left_on_image_right,
    read_dataset,
    to_display,
    to_model_input,
)
from dicom_agent.web.context import FLAG_ORDER, AgentView, agent_of, render
from dicom_agent.web.study import draft_segments

NAV: tuple[str, str] | None = ("Audit one image", "/audit")

#: One audit at a time from the browser: the model is shared with the worker.
_RUN_LOCK = threading.Lock()
_CHUNK = 1 << 20
_PICKABLE_STUDIES = 10


@dataclass(frozen=True)
class Example:
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
                "The lungs are clear. No focal consolidation, pleural effusion or pneumothorax.",
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
            if example is not None:
                path = work / f"{example.name}.png"
                example_picture(example).save(path)
                draft = example.draft
            elif isinstance(upload, UploadFile) and upload.filename:
                path = await _save_upload(upload, work, web.max_upload_bytes)
            elif picked:
                instance = agent.db.instance(picked) if is_valid_uid(picked) else None
                if instance is None or not Path(instance.path).is_file():
                    raise AgentError("that stored instance is gone")
                path = Path(instance.path)
            else:
                raise AgentError("choose an image: upload one, pick a stored one, or an example")
            outcome = await run_in_threadpool(_audit, agent, path, draft)
            if web.keep_uploads:
                _keep(web.uploads, path, outcome["result"])
        except AgentError as exc:
            context = _form_context(agent, draft=draft, error=str(exc))
            return render(request, "audit.html", status_code=400, **context)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return render(request, "audit.html", **_form_context(agent, draft=draft, example=example,
                                                         **outcome))


def _prepare(path: Path, size: int, profile: str) -> tuple[ImageInput, ImageRef, DisplayImage]:
    """The model input, its reference and the display picture of one DICOM file or picture.

    DICOM goes through the worker's rendering (:mod:`dicom_agent.pixels`); a picture is taken as
    display-ready greys with no known orientation, as ``cxr-agent audit`` takes it.
    """
    sop_uid = view = None
    try:
        with path.open("rb") as fh:
            fh.seek(128)  # PS3.10 7.1: a 128-byte preamble, then "DICM"
            is_dicom = fh.read(4) == b"DICM"
        if is_dicom:
            ds = read_dataset(path)
            display = to_display(ds)
            left_on_right = patient_left_on_image_right(ds)
            sop_uid = str(ds.get("SOPInstanceUID", "")) or None
            view = str(ds.get("ViewPosition", "")) or None
        else:
            with Image.open(path) as picture:
                greys = np.asarray(picture.convert("L"))
            display = DisplayImage(greys, "MONOCHROME2", None, None, ())
            left_on_right = None  # a picture carries no Patient Orientation
    except (OSError, UnidentifiedImageError) as exc:
        raise AgentError("neither DICOM nor a readable PNG/JPEG picture") from exc
    model = to_model_input(display, size)
    ref = ImageRef(
        index=0,
        image_id=sop_uid or path.name,
        sop_instance_uid=sop_uid,
        view_position=view,
        width=model.geometry.source_width,
        height=model.geometry.source_height,
        frame=model.frame,
        profile=profile,
    )
    return ImageInput(model.image, 0, model.geometry, left_on_right), ref, display


def _audit(agent: AgentView, path: Path, draft: str) -> dict[str, Any]:
    """Prepare ``path``, run the agent's model on it, draw the overlay."""
    settings = agent.settings
    profile = settings.grounding.profile
    image, ref, display = _prepare(path, settings.grounding.input_size, profile)
    runner = agent.models.get(profile)
    if runner is None:
        state = agent.models.status().get(profile, {})
        raise AgentError(f"the model of profile {profile} is {state.get('state', 'not loaded')}"
                         f"{': ' + str(state['reason']).splitlines()[0] if state.get('reason') else ''}")
    text = draft if draft.strip() else None
    item = AuditItem(images=[image], image_refs=[ref], draft_text=text, study=StudyKeys(),
                     draft_sha256=hashlib.sha256(draft.encode()).hexdigest() if text else None)
    started = time.perf_counter()
    try:
        with _RUN_LOCK:
            (result,) = runner.audit_batch([item])
    except CxrAuditError as exc:
        raise AgentError(f"audit failed: {str(exc).splitlines()[0]}") from exc
    took = time.perf_counter() - started
    overlay = io.BytesIO()
    render_overlay(display.pixels, result, 0).save(overlay, format="PNG", compress_level=1)
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
