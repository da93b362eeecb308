"""What the listener accepts, and the statuses it answers with.

The lists here are the machine-readable half of our conformance statement (docs/conformance.md):
the Storage SOP classes we audit (PS3.4 Annex B.5), the transfer syntaxes we accept for them
(PS3.5 Section 10 and Annex A), and the named DIMSE status values the C-STORE and C-ECHO handlers
return (Storage: PS3.4 Annex B.2.3; general: PS3.7 Annex C).
"""

from __future__ import annotations

import re

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

# -- SOP classes (PS3.4 Annex B.5, Table B.5-1) ---------------------------------------------------

VERIFICATION_SOP_CLASS = str(Verification)

#: Implementation Class UID (PS3.7 D.3.3.2, PS3.10 7.1) of this agent: sent in association
#: negotiation and written into the File Meta Information of every spooled file. A fixed UUID-
#: derived UID under the 2.25 root (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.93425981259067697477720694814832161078"
IMPLEMENTATION_VERSION_NAME = "CXRAUDIT_010"

#: Storage SOP classes whose instances are stored *and* considered for audit. Chest radiography
#: arrives as CR or DX (either intent); Secondary Capture covers scanned or re-exported films;
#: XA/XRF (with the enhanced variants) feed the angiography profile.
AUDITABLE_STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "Enhanced XRF Image Storage",
}

# -- transfer syntaxes (PS3.5 Section 10, Annex A) -------------------------------------------------

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: Accepted transfer syntaxes, in our order of preference. Explicit VR Big Endian is retired
#: (PS3.5 A.3) but still sent by a few old modalities; the bytes are stored as sent and pydicom
#: reads them, so accepting it costs nothing and refusing it would lose the study.
ACCEPTED_TRANSFER_SYNTAXES: dict[str, str] = {
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR Little Endian",
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: "Deflated Explicit VR Little Endian",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless)",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

# -- DIMSE statuses -------------------------------------------------------------------------------

#: PS3.7 Annex C.1.1: Success.
STATUS_SUCCESS = 0x0000
#: PS3.4 Annex B.2.3, "Refused: Out of Resources" (A7xx). Sent when the disk is full, the
#: free-space floor is reached or the state database fails: a retry later can succeed.
STATUS_OUT_OF_RESOURCES = 0xA700
#: PS3.4 Annex B.2.3, "Refused: Out of Resources" (A7xx), our sub-code for an instance larger
#: than ``scp.max_instance_bytes``: a local policy limit, told apart from a full disk.
STATUS_REFUSED_TOO_LARGE = 0xA701
#: PS3.4 Annex B.2.3, "Error: Data Set Does Not Match SOP Class" (A9xx): the data set's SOP Class
#: or SOP Instance UID disagrees with the C-STORE command's Affected SOP Class / Instance UID.
STATUS_DATASET_MISMATCH = 0xA900
#: PS3.4 Annex B.2.3, "Error: Cannot Understand" (Cxxx), the sub-code pynetdicom and dcmtk use
#: for a data set that cannot be decoded, or lacks or carries invalid key UIDs.
STATUS_CANNOT_UNDERSTAND = 0xC210
#: PS3.4 Annex B.2.3, "Error: Cannot Understand" (Cxxx): an unexpected internal error. The
#: handler never raises, so this is what the peer sees instead of an aborted association.
STATUS_PROCESSING_FAILURE = 0xC211

STATUS_NAMES: dict[int, str] = {
    STATUS_SUCCESS: "Success",
    STATUS_OUT_OF_RESOURCES: "Refused: Out of Resources",
    STATUS_REFUSED_TOO_LARGE: "Refused: Out of Resources (instance too large)",
    STATUS_DATASET_MISMATCH: "Error: Data Set Does Not Match SOP Class",
    STATUS_CANNOT_UNDERSTAND: "Error: Cannot Understand",
    STATUS_PROCESSING_FAILURE: "Error: Cannot Understand (processing failure)",
}

# -- UIDs (PS3.5 Section 9.1) -----------------------------------------------------------------------

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a UID per PS3.5 9.1: digit components without leading zeros,
    separated by single dots, at most 64 characters. Only such strings become file names."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID_RE.match(value))


def is_auditable(sop_class_uid: str) -> bool:
    """True when instances of this SOP class are stored for audit (not merely kept)."""
    return sop_class_uid in AUDITABLE_STORAGE_SOP_CLASSES
