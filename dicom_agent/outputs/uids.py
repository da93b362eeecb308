"""Deterministic UIDs for the objects we write.

A UID is derived from a hash of what the object is about, under the ``2.25`` root of PS3.5
B.2 (a UUID-derived integer): identical inputs give identical UIDs, so an audit that is re-run
after a crash re-sends the same instances and the archive keeps one copy instead of duplicates.
A re-audit changes the result (its ``result_version`` at least), hence new instance UIDs.
"""

from __future__ import annotations

import hashlib
import json

from cxr_auditor.schema import AuditResult

UID_ROOT = "2.25."
_UID_BYTES = 15  # 120 bits: at most 37 decimal digits, 42 characters with the root (<= 64, PS3.5 9.1)

# Fields that change between two runs of the same audit and so must not change its UIDs.
_VOLATILE_FIELDS = {"timings", "outputs"}


def result_digest(result: AuditResult) -> str:
    """SHA-256 of the result's content: sources, findings, flags, model provenance, version.

    Timings and the outputs map are left out, since they differ between identical runs.
    """
    content = result.model_dump(mode="json", exclude=_VOLATILE_FIELDS)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def derive_uid(*parts: str) -> str:
    """A ``2.25.<integer>`` UID from the SHA-256 of ``parts`` (order matters)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:_UID_BYTES]
    # A leading zero digit is impossible for a non-zero int; zero itself is astronomically unlikely
    # but would still be a valid component ("0").
    return UID_ROOT + str(int.from_bytes(digest, "big"))


def instance_uid(result: AuditResult, kind: str) -> str:
    """SOP Instance UID of the object ``kind`` (``sr``, ``gsps:0``, ``sc:0``...) of ``result``."""
    sources = sorted(img.image_id for img in result.inputs.images)
    return derive_uid("instance", kind, *sources, result_digest(result))


def series_uid(study_instance_uid: str, kind: str) -> str:
    """Series Instance UID of our ``kind`` series in a study; stable across result versions.

    Every version of our SR lands in one series, and so on for GSPS and SC, so the archive shows
    one research series per object type rather than one per re-audit.
    """
    return derive_uid("series", kind, study_instance_uid)
