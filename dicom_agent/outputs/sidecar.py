"""The JSON sidecar: ``audit.json`` (the latest result) and ``v<N>/audit.json`` (each version).

The sidecar is the master copy of an audit, with every flag, its rationale and the draft span;
the DICOM objects are views of it. Where it lives and when a version may be written again is
:mod:`dicom_agent.outputs.layout`'s business; reading one back is
:func:`~dicom_agent.outputs.layout.read_result`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cxr_auditor.schema import AuditResult
from dicom_agent.files import atomic_write_text
from dicom_agent.outputs.layout import SIDECAR_NAME, check_version_free, read_result, version_dir

logger = logging.getLogger(__name__)


def write_sidecar(study_dir: Path, result: AuditResult) -> Path:
    """Write ``v<N>/audit.json`` and, unless a newer version is there, ``audit.json``."""
    check_version_free(study_dir, result)
    text = result.to_json() + "\n"
    path = atomic_write_text(version_dir(study_dir, result.result_version) / SIDECAR_NAME, text)
    latest = study_dir / SIDECAR_NAME
    if latest.exists():
        current = read_result(latest).result_version
        if current > result.result_version:
            logger.warning(
                "audit.json keeps version %d; version %d written to its folder only",
                current,
                result.result_version,
            )
            return path
    atomic_write_text(latest, text)
    return path
