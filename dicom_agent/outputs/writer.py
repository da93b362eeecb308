"""Writing one result version: every enabled object, validated, into ``v<N>/``.

:func:`write_outputs` builds the SR (TID 1500), one GSPS, Secondary Capture and overlay PNG per
audited image, and the JSON sidecar, in the folders :mod:`.layout` names. Every file is written
atomically; every DICOM object is validated (:mod:`.validate`) before it is written, and one that
fails goes to ``failed/`` with a ``.reason.txt`` instead of being sent. See docs/outputs.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from cxr_auditor.render import render_overlay
from cxr_auditor.schema import AuditResult
from dicom_agent.config import AgentSettings, OutputSettings
from dicom_agent.errors import OutputError
from dicom_agent.files import atomic_write_bytes, atomic_write_text
from dicom_agent.outputs.common import contributing_equipment, read_header
from dicom_agent.outputs.gsps import build_gsps
from dicom_agent.outputs.layout import (
    FAILED_DIR,
    check_version_free,
    object_file_name,
    previous_sr,
    version_dir,
)
from dicom_agent.outputs.sc import build_sc
from dicom_agent.outputs.sidecar import write_sidecar
from dicom_agent.outputs.sr import build_sr
from dicom_agent.outputs.uids import instance_uid, series_uid
from dicom_agent.outputs.validate import encode_validated
from dicom_agent.pixels import DisplayImage

logger = logging.getLogger(__name__)


class _Writer:
    """Builds, validates and writes the objects of one result version."""

    def __init__(self, study_dir: Path, result: AuditResult) -> None:
        self.study_dir = study_dir
        self.result = result
        self.folder = version_dir(study_dir, result.result_version)
        self.outputs: dict[str, str] = {}

    def dicom(self, kind: str, build: Callable[[], Dataset]) -> None:
        """Build, validate, then write; a failure lands in ``failed/`` and is not returned."""
        name = object_file_name(kind)
        try:
            ds = build()
        except OutputError as exc:
            self._fail(name, exc, None)
            return
        try:
            data = encode_validated(ds)
        except OutputError as exc:
            self._fail(name, exc, ds)
            return
        atomic_write_bytes(self.folder / name, data)
        self.outputs[kind] = str(ds.SOPInstanceUID)

    def _fail(self, name: str, exc: OutputError, ds: Dataset | None) -> None:
        """Keep the reason (and the object, when it was built) in ``failed/`` for inspection."""
        # Only the kind and version go to the log; the reason (which may quote values) goes to
        # the reason file beside the other outputs.
        logger.warning(
            "output %s of result version %d failed validation; moved to %s/",
            name,
            self.result.result_version,
            FAILED_DIR,
        )
        stem = self.study_dir / FAILED_DIR / f"v{self.result.result_version}-{name}"
        atomic_write_text(stem.with_name(stem.name + ".reason.txt"), f"{exc}\n")
        if ds is None:
            return
        buffer = BytesIO()
        try:
            # no file-format enforcement: the object is kept as built, invalid parts included
            ds.save_as(buffer)
        except (ValueError, TypeError, AttributeError, OverflowError):
            return  # it cannot even be encoded; the reason file says why
        atomic_write_bytes(stem, buffer.getvalue())


def write_outputs(
    result: AuditResult,
    *,
    sources: dict[int, Path],
    display: dict[int, DisplayImage],
    study_dir: Path,
    settings: AgentSettings,
) -> AuditResult:
    """Write every enabled output of ``result`` and return it with ``outputs`` filled.

    ``sources`` maps image index to the stored source instance, ``display`` to its windowed
    picture at source resolution. The SR of the newest earlier version, if any, is named in
    the new SR's Predecessor Documents Sequence (:func:`.layout.previous_sr`).
    Raises OutputError when version N already holds a different audit.
    """
    check_version_free(study_dir, result)
    enabled = settings.outputs
    headers = {i: read_header(p) for i, p in sorted(sources.items())}
    writer = _Writer(study_dir, result)

    if enabled.sr and headers:
        previous = previous_sr(study_dir, result.result_version)
        study_uid = str(next(iter(headers.values())).StudyInstanceUID)
        writer.dicom(
            "sr",
            partial(
                build_sr,
                result,
                headers,
                sop_instance_uid=instance_uid(result, "sr"),
                series_instance_uid=series_uid(study_uid, "sr"),
                series_number=enabled.series_number_sr,
                previous=previous,
            ),
        )

    for index in sorted(set(headers) | set(display)):
        _image_objects(writer, enabled, index, headers.get(index), display.get(index))

    final = result.model_copy(update={"outputs": writer.outputs})
    if enabled.json_sidecar:
        write_sidecar(study_dir, final)
    return final


def _image_objects(
    writer: _Writer,
    enabled: OutputSettings,
    index: int,
    source: Dataset | None,
    image: DisplayImage | None,
) -> None:
    """The per-image objects: GSPS on the source, overlay PNG and Secondary Capture."""
    result = writer.result
    if enabled.gsps and source is not None:
        writer.dicom(
            f"gsps:{index}",
            partial(
                build_gsps,
                result,
                index,
                source,
                window=image.window if image is not None else None,
                sop_instance_uid=instance_uid(result, f"gsps:{index}"),
                series_instance_uid=series_uid(str(source.StudyInstanceUID), "gsps"),
                series_number=enabled.series_number_gsps,
            ),
        )
    if image is None or not (enabled.overlay_png or (enabled.secondary_capture and source)):
        return
    picture = render_overlay(image.pixels, result, index)
    if enabled.overlay_png:
        atomic_write_bytes(writer.folder / f"overlay-{index}.png", _png(picture))
    if enabled.secondary_capture and source is not None:
        writer.dicom(
            f"sc:{index}",
            partial(
                build_sc,
                _rgb_array(picture),
                source,
                instance_number=result.result_version,
                sop_instance_uid=instance_uid(result, f"sc:{index}"),
                series_instance_uid=series_uid(str(source.StudyInstanceUID), "sc"),
                series_number=enabled.series_number_sc,
                contributing_equipment=contributing_equipment(result),
            ),
        )


def _png(picture: Image.Image) -> bytes:
    buffer = BytesIO()
    # Level 1: on a 3000 x 2500 overlay zlib's default (6) took 1.4 s for a 10 % smaller file,
    # level 1 about 0.4 s; the worker's output thread should not wait on compression.
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _rgb_array(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.uint8)
