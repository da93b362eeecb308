"""Coded concepts for our labels and audit flags (PS3.16 codes plus the private ``99CXRAUD``).

Standard codes were checked against the PS3.16 dictionaries shipped with pydicom (see
``/work/shared/design/OUTPUTS.md`` §3.3). DICOM has no concept for "an AI finding disagrees with
a draft report", so the audit flags use a private coding scheme declared in the Coding Scheme
Identification Sequence (0008,0110) of every object that uses it (PS3.3 C.12.1.1.4), the
pattern PS3.16 Section 8 prescribes for local codes (designator starting with ``99``).
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

from cxr_auditor.labels import Label
from cxr_auditor.schema import FlagKind

PRIVATE_SCHEME = "99CXRAUD"
PRIVATE_SCHEME_NAME = "CXR draft-report audit (research)"
PRIVATE_SCHEME_ORGANIZATION = "cxr-audit-agent project"
PRIVATE_SCHEME_VERSION = "1"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning, PRIVATE_SCHEME_VERSION)


#: Concept name of every audit flag item; its value says which flag.
DRAFT_CONCORDANCE = _private("AUD0001", "Draft report concordance")
FLAG_MISSING = _private("AUD0101", "Image finding missing from draft report")
FLAG_UNSUPPORTED = _private("AUD0102", "Draft report finding unsupported by image analysis")
FLAG_URGENT = _private("AUD0103", "Urgent finding, expedite review")
#: Umbrella finding for ``nodule_mass`` when no pixel spacing lets us tell nodule from mass.
NODULE_OR_MASS = _private("AUD0201", "Nodule or mass")
#: Concept name of the TEXT item carrying the verbatim draft sentence span.
DRAFT_STATEMENT = _private("AUD0002", "Draft report statement")

FLAG_CODES: dict[FlagKind, CodedConcept] = {
    FlagKind.MISSING: FLAG_MISSING,
    FlagKind.UNSUPPORTED: FLAG_UNSUPPORTED,
    FlagKind.URGENT: FLAG_URGENT,
}

# Standard structural and value codes (PS3.16; CID given where the code is taken from one).
FINDING_CATEGORY_ABNORMAL = CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
PRESENCE = CodedConcept("121052", "DCM", "Presence of property")
ABSENT = CodedConcept("272519000", "SCT", "Absent")  # CID 240
CERTAINTY = CodedConcept("111012", "DCM", "Certainty of Finding")
PERCENT = CodedConcept("%", "UCUM", "Percent")
COMMENT = CodedConcept("121106", "DCM", "Comment")
LEVEL_OF_SIGNIFICANCE = CodedConcept("121403", "DCM", "Level of Significance")
HIGHLY_SIGNIFICANT = CodedConcept("371926006", "SCT", "Highly significant")  # CID 220
PROCEDURE_XR = CodedConcept("43468-8", "LN", "XR unspecified body region")  # CID 100
DEVICE_OBSERVER = CodedConcept("121007", "DCM", "Device")
PROCESSING_EQUIPMENT = CodedConcept("109102", "DCM", "Processing Equipment")  # CID 7005

FINDING_CODES: dict[Label, CodedConcept] = {
    Label.PLEURAL_EFFUSION: CodedConcept("60046008", "SCT", "Pleural effusion"),
    Label.PNEUMOTHORAX: CodedConcept("36118008", "SCT", "Pneumothorax"),
    Label.LUNG_OPACITY_CONSOLIDATION: CodedConcept("112001", "DCM", "Opacity"),  # CID 6104
    Label.CARDIOMEGALY: CodedConcept("287272002", "SCT", "Cardiomegaly"),
    Label.NO_FINDING: CodedConcept("111286", "DCM", "No abnormality"),
}
NODULE = CodedConcept("27925004", "SCT", "Nodule")  # CID 6104
MASS = CodedConcept("4147007", "SCT", "Mass")  # CID 6104

_PLEURA = CodedConcept("3120008", "SCT", "Pleura")
_LUNG = CodedConcept("39607008", "SCT", "Lung")
FINDING_SITES: dict[Label, CodedConcept] = {
    Label.PLEURAL_EFFUSION: _PLEURA,
    Label.PNEUMOTHORAX: _PLEURA,
    Label.LUNG_OPACITY_CONSOLIDATION: _LUNG,
    Label.NODULE_MASS: _LUNG,
    Label.CARDIOMEGALY: CodedConcept("80891009", "SCT", "Heart"),
    Label.NO_FINDING: CodedConcept("816094009", "SCT", "Chest"),
}

#: Long-axis size above which a lung lesion is called a mass (Fleischner glossary usage).
MASS_THRESHOLD_MM = 30.0


def finding_code(label: Label, long_axis_mm: float | None = None) -> CodedConcept:
    """The Finding code of ``label``.

    ``nodule_mass`` becomes Nodule (<= 30 mm) or Mass only when the caller knows the lesion's
    physical size; without pixel spacing it is the private umbrella code, never a guess.
    """
    if label is Label.NODULE_MASS:
        if long_axis_mm is None:
            return NODULE_OR_MASS
        return NODULE if long_axis_mm <= MASS_THRESHOLD_MM else MASS
    return FINDING_CODES[label]


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item declaring ``99CXRAUD`` (PS3.3 C.12.1.1.4)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        version=PRIVATE_SCHEME_VERSION,
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )
