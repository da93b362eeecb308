"""The out/ folder layout and result versions: where every result file lives, in one place.

::

    <paths.out>/<StudyInstanceUID>/        study_dir()
        audit.json                         the latest version's sidecar (SIDECAR_NAME)
        v<N>/                              version_dir(): one immutable folder per version
            audit.json  sr.dcm  gsps-<i>.dcm  sc-<i>.dcm  overlay-<i>.png
        failed/v<N>-<object>.dcm[.reason.txt]   objects that failed validation (FAILED_DIR)

A result version is never silently replaced. Writing version N again is allowed only when it
holds the same audit (a re-run after a crash, compared by
:func:`dicom_agent.outputs.uids.result_digest`, which ignores timings);
:func:`free_version` moves a re-run whose audit differs to the next version free on disk and in
the job table, and :func:`previous_sr` finds the SR a new version supersedes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from pydicom.dataset import Dataset

from cxr_auditor.schema import AuditResult
from dicom_agent.config import AgentSettings
from dicom_agent.conformance import is_valid_uid
from dicom_agent.errors import OutputError
from dicom_agent.outputs.common import read_header
from dicom_agent.outputs.uids import result_digest

logger = logging.getLogger(__name__)

SIDECAR_NAME = "audit.json"
FAILED_DIR = "failed"


def study_dir(settings: AgentSettings, study_uid: str) -> Path:
    """``out/<StudyInstanceUID>/``; the UID is checked so it cannot name another folder."""
    if not is_valid_uid(study_uid):  # PS3.5 9.1: digits and dots only, never a path
        raise ValueError("study UID is not usable as a folder name")
    return settings.paths.out / study_uid


def version_dir(study_dir: Path, result_version: int) -> Path:
    """The folder holding the objects of one result version."""
    return study_dir / f"v{result_version}"


def version_numbers(study_dir: Path) -> list[int]:
    """The result versions that have a folder (``v<N>``) under ``study_dir``, ascending."""
    if not study_dir.is_dir():
        return []
    return sorted(
        int(p.name[1:]) for p in study_dir.iterdir() if p.name[1:].isdigit() and p.name[0] == "v"
    )


def object_file_name(kind: str) -> str:
    """File name of an output kind: ``sr`` → ``sr.dcm``, ``gsps:0`` → ``gsps-0.dcm``."""
    base, _, index = kind.partition(":")
    return f"{base}-{index}.dcm" if index else f"{base}.dcm"


def read_result(path: Path) -> AuditResult:
    """Load an AuditResult sidecar; OutputError if unreadable."""
    try:
        return AuditResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as exc:
        raise OutputError(f"{path.name} in {path.parent.name} is not a readable AuditResult") from exc


def _holds_other_audit(study_dir: Path, result: AuditResult) -> bool:
    """Whether version N of the study exists already with a different audit in it."""
    existing = version_dir(study_dir, result.result_version) / SIDECAR_NAME
    return existing.exists() and result_digest(read_result(existing)) != result_digest(result)


def check_version_free(study_dir: Path, result: AuditResult) -> None:
    """Raise OutputError if version N exists already with a different audit in it."""
    if _holds_other_audit(study_dir, result):
        raise OutputError(
            f"result version {result.result_version} already exists with different content; "
            "a re-audit must increment result_version"
        )


def free_version(
    study_dir: Path, result: AuditResult, renumber: Callable[[int], int]
) -> AuditResult:
    """``result``, or a copy under a new version when its folder holds a different audit.

    That happens when the draft changed between a crash and the re-run. ``renumber(at_least)``
    records the move (:meth:`dicom_agent.state.StateDB.renumber_job`, which also skips versions
    other jobs of the study hold) and returns the version to use; ``at_least`` is one past the
    highest version on disk.
    """
    if not _holds_other_audit(study_dir, result):
        return result
    return result.model_copy(
        update={"result_version": renumber(max(version_numbers(study_dir)) + 1)}
    )


def previous_sr(study_dir: Path, result_version: int) -> Dataset | None:
    """Header of the SR that version ``result_version`` supersedes: the newest earlier version's.

    None when no earlier version exists or it wrote no SR; a missing or different SR file is
    logged (the new SR then has no Predecessor Documents Sequence).
    """
    for version in range(result_version - 1, 0, -1):
        sidecar = version_dir(study_dir, version) / SIDECAR_NAME
        if not sidecar.exists():
            continue
        uid = read_result(sidecar).outputs.get("sr")
        if uid is None:
            return None
        path = version_dir(study_dir, version) / object_file_name("sr")
        ds = read_header(path) if path.exists() else None
        if ds is not None and ds.SOPInstanceUID == uid:
            return ds
        logger.warning("SR of result version %d not found; no predecessor reference", version)
        return None
    return None


def objects_to_send(study_dir: Path, result: AuditResult) -> list[Path]:
    """The validated DICOM files of ``result`` (its ``outputs``), SR first."""
    folder = version_dir(study_dir, result.result_version)
    paths = []
    for kind in sorted(result.outputs, key=lambda k: (k != "sr", k)):
        path = folder / object_file_name(kind)
        if path.exists():
            paths.append(path)
        else:
            logger.warning("output %s of version %d is missing on disk", kind, result.result_version)
    return paths
