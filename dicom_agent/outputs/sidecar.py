"""The JSON sidecar: ``audit.json`` (the latest result) and ``v<N>/audit.json`` (each version).

The sidecar is the master copy of an audit, with every flag, its rationale and the draft span;
the DICOM objects are views of it. A version folder is never silently replaced: writing
version N again is allowed only when the content is the same audit (a re-run after a crash),
compared by :func:`dicom_agent.outputs.uids.result_digest`, which ignores timings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from cxr_auditor.schema import AuditResult
from dicom_agent.errors import OutputError
from dicom_agent.files import atomic_write_text
from dicom_agent.outputs.uids import result_digest

logger = logging.getLogger(__name__)

SIDECAR_NAME = "audit.json"


def version_dir(study_dir: Path, result_version: int) -> Path:
    """The folder holding the objects of one result version."""
    return study_dir / f"v{result_version}"


def read_result(path: Path) -> AuditResult:
    """Load an AuditResult written by :func:`write_sidecar`; OutputError if unreadable."""
    try:
        return AuditResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as exc:
        raise OutputError(f"{path.name} in {path.parent.name} is not a readable AuditResult") from exc


def check_version_free(study_dir: Path, result: AuditResult) -> None:
    """Raise OutputError if version N exists already with a different audit in it."""
    existing = version_dir(study_dir, result.result_version) / SIDECAR_NAME
    if not existing.exists():
        return
    if result_digest(read_result(existing)) != result_digest(result):
        raise OutputError(
            f"result version {result.result_version} already exists with different content; "
            "a re-audit must increment result_version"
        )


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
