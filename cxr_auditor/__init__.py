"""The audit core: images and draft text in, a versioned :class:`AuditResult` out.

It knows nothing of DICOM, files or sockets (``dicom_agent`` owns those) and imports model
libraries (torch, transformers) only when a model is loaded. See ARCHITECTURE.md.
"""

from cxr_auditor.comparator import COMPARATOR_VERSION, compare
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.errors import (
    BackendError,
    CxrAuditError,
    DraftInputError,
    ModelUnavailable,
    ParseError,
    ProfileError,
)
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding.base import Grounder, ImageInput
from cxr_auditor.grounding.fake import FakeGrounder
from cxr_auditor.labels import (
    DEFAULT_URGENT,
    LABELS,
    POSITIVE_LABELS,
    Label,
    display_name,
    normalize_label,
    parse_urgent,
    sort_labels,
)
from cxr_auditor.parsing import (
    extract_finding_list,
    parse_draft_output,
    parse_grounding_output,
)
from cxr_auditor.pipeline import AuditItem, Auditor
from cxr_auditor.schema import (
    DISCLAIMER,
    SCHEMA_VERSION,
    AuditMode,
    AuditResult,
    Box,
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    ImageRef,
    Inputs,
    Laterality,
    ModelInfo,
    PixelBox,
    StudyKeys,
    UnmappedMention,
)

__all__ = [
    "AuditItem",
    "AuditMode",
    "AuditResult",
    "Auditor",
    "BackendError",
    "Box",
    "COMPARATOR_VERSION",
    "CxrAuditError",
    "DEFAULT_URGENT",
    "DISCLAIMER",
    "DraftFinding",
    "DraftInputError",
    "DraftParser",
    "DraftResult",
    "DraftState",
    "DraftStatus",
    "FakeGrounder",
    "Flag",
    "FlagKind",
    "Geometry",
    "Grounder",
    "GroundingResult",
    "GroundingState",
    "ImageFinding",
    "ImageInput",
    "ImageRef",
    "Inputs",
    "LABELS",
    "Label",
    "Laterality",
    "ModelInfo",
    "ModelUnavailable",
    "POSITIVE_LABELS",
    "ParseError",
    "PixelBox",
    "ProfileError",
    "SCHEMA_VERSION",
    "StudyKeys",
    "UnmappedMention",
    "compare",
    "display_name",
    "extract_finding_list",
    "normalize_label",
    "parse_draft_output",
    "parse_grounding_output",
    "parse_urgent",
    "sort_labels",
]
