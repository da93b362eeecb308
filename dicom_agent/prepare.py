"""Study preparation: from stored instances to what the model and the outputs need.

One path for ``serve`` (the worker's decode pool) and for ``cxr-agent audit``: the instances of
a study are routed (:mod:`dicom_agent.routing`: which images are audited, by which profile,
lateral views skipped), each selected one is decoded and windowed (:mod:`dicom_agent.pixels`;
a contrast run on its fullest frame) and letterboxed for the model, and the study's keys and
draft go with them into one :class:`~cxr_auditor.pipeline.AuditItem`. An image that cannot be
decoded is skipped with reason ``decode_failed`` rather than sinking the study.

``audit`` gives files instead of stored instances: :func:`instances_from_files` reads their
headers into the same rows the state DB holds. A PNG or JPEG picture has no header, so it is
not routed: it is taken as display-ready greys with an unknown orientation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.pipeline import AuditItem
from cxr_auditor.profiles import Profile, get_profile
from cxr_auditor.schema import ImageRef, StudyKeys
from dicom_agent.config import AgentSettings
from dicom_agent.errors import AgentError
from dicom_agent.observe import event
from dicom_agent.pixels import (
    DisplayImage,
    patient_left_on_image_right,
    read_dataset,
    to_display,
    to_model_input,
)
from dicom_agent.routing import ProfileRoutes, route_study
from dicom_agent.state import DraftRow, InstanceRow, InstanceState, StudyRow

log = logging.getLogger(__name__)

_DICM_OFFSET = 128  # PS3.10 7.1: a 128-byte preamble, then the "DICM" prefix


@dataclass(frozen=True)
class Draft:
    """The draft a study is audited against (text None or blank: no draft)."""

    text: str | None
    file_name: str | None = None
    sha256: str | None = None

    def __repr__(self) -> str:  # the text and file name can carry PHI
        return f"Draft(text={self.text is not None}, [secure])"

    @classmethod
    def of(cls, row: DraftRow | None) -> Draft | None:
        """The stored draft a study is paired with (None: no draft)."""
        return cls(row.text, row.file_name, row.sha256) if row is not None else None


def stored_study_keys(study_uid: str, study: StudyRow | None) -> StudyKeys:
    """The keys of a study the agent stored (accession number from its row, when it has one)."""
    return StudyKeys(
        study_instance_uid=study_uid, accession_number=study.accession_number if study else None
    )


@dataclass
class PreparedStudy:
    """One study ready for the model: the item, its profile, and per image index the stored
    source file (for the DICOM outputs) and the windowed picture (for the overlays)."""

    profile: str
    item: AuditItem
    sources: dict[int, Path] = field(default_factory=dict)
    display: dict[int, DisplayImage] = field(default_factory=dict)


def configured_for(settings: AgentSettings, profile: Profile) -> AgentSettings:
    """``settings`` with ``profile`` configured where serve would route to it (``replay``,
    ``eval`` and ``audit`` with ``--profile``)."""
    key = "xa_profile" if profile.task == "classification" else "profile"
    grounding = settings.grounding.model_copy(update={key: profile.name})
    return settings.model_copy(update={"grounding": grounding})


def profile_routes(settings: AgentSettings) -> dict[str, ProfileRoutes]:
    """Routing rules of the configured profiles, so a profile can veto an instance."""
    out: dict[str, ProfileRoutes] = {}
    for name in (settings.grounding.profile, settings.grounding.xa_profile):
        if name:
            try:
                out[name] = get_profile(name, settings.paths.profiles).routes
            except Exception:  # an unknown profile surfaces when it is loaded
                continue
    return out


def prepare_study(
    instances: Sequence[InstanceRow],
    settings: AgentSettings,
    *,
    study: StudyKeys,
    draft: Draft | None = None,
    result_version: int = 1,
    routes: dict[str, ProfileRoutes] | None = None,
    pictures: Sequence[Path] = (),
    fallback_profile: str | None = None,
    log_fields: dict[str, Any] | None = None,
) -> PreparedStudy:
    """Route, decode and letterbox a study's instances into one :class:`PreparedStudy`.

    ``routes`` defaults to :func:`profile_routes` (the worker reads them once per batch).
    ``pictures`` (``audit`` only) follow the routed images, audited by the same profile.
    ``fallback_profile`` (default ``grounding.profile``) runs the study when no instance was
    routed (only pictures, or nothing to audit).
    ``log_fields`` are added to the log records (job id, hashed study reference).
    Raises AgentError for a picture that cannot be read.
    """
    fields = log_fields or {}
    route = route_study(
        instances,
        settings.grounding.profile,
        xa_profile=settings.grounding.xa_profile,
        profile_routes=profile_routes(settings) if routes is None else routes,
    )
    profile = route.profile or fallback_profile or settings.grounding.profile
    log.debug("routed %d images to %s, %d skipped", len(route.selected), profile,
              len(route.skipped), extra=event(profile=profile, **fields))
    images = _Images(profile, settings.grounding.input_size)
    skipped = list(route.skipped)
    for row in route.selected:
        try:
            images.add_instance(row)
        except Exception as exc:  # one bad image must not sink the study's other images
            log.warning("image not decodable (%s); skipped", type(exc).__name__,
                        extra=event(reason="decode_failed", **fields))
            skipped.append({"image_id": row.sop_instance_uid, "reason": "decode_failed"})
    for path in pictures:
        images.add_picture(path)
    d = draft or Draft(None)
    item = AuditItem(
        images=images.inputs,
        image_refs=images.refs,
        draft_text=d.text,
        study=study,
        draft_file=d.file_name,
        draft_sha256=d.sha256,
        skipped_images=skipped,
        result_version=result_version,
    )
    return PreparedStudy(profile, item, images.sources, images.display)


class _Images:
    """The decoded images of one study, in image-index order."""

    def __init__(self, profile: str, size: int) -> None:
        self.profile, self.size = profile, size
        self.inputs: list[ImageInput] = []
        self.refs: list[ImageRef] = []
        self.sources: dict[int, Path] = {}
        self.display: dict[int, DisplayImage] = {}

    def add_instance(self, row: InstanceRow) -> None:
        """Decode a stored instance; raises whatever decoding raises (nothing is added)."""
        ds = read_dataset(Path(row.path))
        # a contrast run is judged on its fullest frame, a radiograph on its only one
        display = to_display(ds, frame_rule="max_opacity" if row.modality == "XA" else "first")
        index = self._add(display, patient_left_on_image_right(ds), {
            "image_id": row.sop_instance_uid,
            "sop_instance_uid": row.sop_instance_uid,
            "series_instance_uid": row.series_instance_uid,
            "sop_class_uid": row.sop_class_uid,
            "view_position": row.view_position,
        })
        self.sources[index] = Path(row.path)

    def add_picture(self, path: Path) -> None:
        """A PNG or JPEG: display-ready greys with no Patient Orientation (side unknown)."""
        self._add(_picture(path), None, {"image_id": path.name})

    def _add(self, display: DisplayImage, left_on_right: bool | None, ref: dict[str, Any]) -> int:
        model_image = to_model_input(display, self.size)
        index = len(self.inputs)
        self.inputs.append(ImageInput(model_image.image, index, model_image.geometry, left_on_right))
        self.refs.append(
            ImageRef(
                index=index,
                width=model_image.geometry.source_width,
                height=model_image.geometry.source_height,
                frame=model_image.frame,
                profile=self.profile,
                **ref,
            )
        )
        self.display[index] = display
        return index


def _picture(path: Path) -> DisplayImage:
    try:
        with Image.open(path) as picture:
            greys = np.asarray(picture.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise AgentError(f"{path.name}: neither DICOM nor a readable picture") from exc
    return DisplayImage(greys, "MONOCHROME2", None, None, ())


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    with path.open("rb") as fh:
        fh.seek(_DICM_OFFSET)
        return fh.read(4) == b"DICM"


def instances_from_files(paths: Sequence[Path]) -> tuple[list[InstanceRow], list[Path], StudyKeys]:
    """Rows for DICOM files that were never stored, as the state DB would hold them, the
    picture files among ``paths``, and the study keys of the first DICOM file.

    Raises AgentError for a DICOM file whose header cannot be read.
    """
    rows: list[InstanceRow] = []
    pictures: list[Path] = []
    study = StudyKeys()
    for path in paths:
        if not is_dicom_file(path):
            pictures.append(path)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            raise AgentError(f"{path.name}: cannot read its DICOM header ({type(exc).__name__})") from exc

        def attr(keyword: str, ds: Any = ds) -> str | None:
            return str(ds.get(keyword, "")).strip() or None

        if not rows:
            study = StudyKeys(
                study_instance_uid=attr("StudyInstanceUID"),
                accession_number=attr("AccessionNumber"),
            )
        rows.append(
            InstanceRow(
                sop_instance_uid=attr("SOPInstanceUID") or path.name,
                study_instance_uid=attr("StudyInstanceUID") or "",
                series_instance_uid=attr("SeriesInstanceUID") or "",
                sop_class_uid=attr("SOPClassUID") or "",
                modality=attr("Modality"),
                transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
                view_position=attr("ViewPosition"),
                body_part=attr("BodyPartExamined"),
                path=str(path),
                sha256="",
                size=path.stat().st_size,
                state=InstanceState.STORED.value,
                received_at=0.0,
                updated_at=0.0,
            )
        )
    return rows, pictures, study
