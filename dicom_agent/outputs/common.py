"""What the SR, GSPS and Secondary Capture builders share, in one place.

Our device's identity (manufacturer, software version, the grounding model's provenance as
Contributing Equipment, PS3.3 C.7.5.1, and a device UID), how a box and an audited frame are
referenced in the source image, the attributes copied from the source, and reading a source
header.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_auditor.schema import AuditResult, ImageFinding
from dicom_agent.errors import OutputError
from dicom_agent.outputs import codes
from dicom_agent.outputs.uids import derive_uid

MANUFACTURER = "cxr-audit-agent project"
DEVICE_NAME = "cxr-audit-agent (RESEARCH ONLY)"


def agent_version() -> str:
    """The installed agent version, for SoftwareVersions of every object we write."""
    try:
        return version("cxr-audit-agent")
    except PackageNotFoundError:
        return "unknown"


def grounding_model(result: AuditResult) -> tuple[str, str, list[str]]:
    """(name, version, parameters) of the grounding model, from the result's provenance."""
    info = next((m for m in result.models if m.task == "grounding"), None)
    params = [f"comparator={result.comparator_version}"]
    if info is None:
        return "unknown grounding model", "unknown", params
    name = info.model_id or info.profile
    if info.adapter:
        name = f"{name} + {info.adapter}"
    if info.prompt_hash:
        params.append(f"prompt_hash={info.prompt_hash}")
    params.append(f"profile={info.profile}")
    params.append(f"backend={info.backend}")
    return name[:64], (info.revision or "unspecified")[:64], params


def device_uid(result: AuditResult) -> str:
    """A UID naming our device: model, version, prompt hash and comparator rules together."""
    name, model_version, params = grounding_model(result)
    return derive_uid("device", name, model_version, *params)


def contributing_equipment(result: AuditResult) -> hd.ContributingEquipment:
    """Our device as Contributing Equipment (PS3.3 C.7.5.1), carrying the disclaimer."""
    name, model_version, _ = grounding_model(result)
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=f"{name} {model_version}"[:64],
        software_versions=agent_version(),
        contribution_description=f"AI draft-report audit. {result.disclaimer}"[:1024],
    )


def referenced_frames(result: AuditResult, index: int, ds: Dataset) -> list[int] | None:
    """Referenced Frame Number(s) of the audited frame of a multi-frame source, else None."""
    frame = result.inputs.images[index].frame if index < len(result.inputs.images) else None
    if frame is None or int(ds.get("NumberOfFrames", 1) or 1) <= 1:
        return None
    return [frame + 1]  # ImageRef.frame is 0-based; Referenced Frame Number is 1-based


def box_polyline(finding: ImageFinding) -> np.ndarray:
    """Closed 5-point rectangle (column, row): TL, TR, BR, BL, TL, in source pixel space.

    Coordinates follow PS3.3 C.18.6.1.1 (origin at the top-left corner of the top-left pixel),
    the same convention as :class:`cxr_auditor.schema.PixelBox`.
    """
    pb = finding.pixel_box
    if pb is None:
        raise OutputError("box_polyline needs a finding with a pixel_box")
    return np.array(
        [[pb.x0, pb.y0], [pb.x1, pb.y0], [pb.x1, pb.y1], [pb.x0, pb.y1], [pb.x0, pb.y0]],
        dtype=float,
    )


def copy_body_part(source: Dataset, target: Dataset) -> None:
    """Copy BodyPartExamined: without it Laterality (Type 2C) is a dciodvfy error."""
    body_part = source.get("BodyPartExamined")
    if body_part:
        target.BodyPartExamined = body_part


def read_header(path: Path) -> Dataset:
    """The header of a stored DICOM file (no pixels); OutputError when it cannot be read."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise OutputError(f"DICOM file {path.name} cannot be read") from exc
