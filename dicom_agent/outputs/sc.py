"""The overlay picture as a Secondary Capture image (PS3.3 A.8.1), shown by every viewer.

The windowed source image with the boxes, captions, legend and research-only banner burned in
(drawn by :func:`cxr_auditor.render.render_overlay` at source resolution), RGB 8-bit, in the
source's study and in a series of its own. Burned In Annotation is YES (PS3.3 C.7.6.1.1.5)
because the pixels carry text.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_agent.errors import OutputError
from dicom_agent.outputs.common import MANUFACTURER, agent_version, copy_body_part

SERIES_DESCRIPTION_SC = "AI AUDIT OVERLAY - RESEARCH USE ONLY - NOT FOR DIAGNOSIS"

# highdicom insists on an orientation for the PATIENT coordinate system; this placeholder is
# replaced right after construction by the source's own value (or an empty Type 2 value).
_PLACEHOLDER_ORIENTATION = ("L", "F")


def build_sc(
    picture: np.ndarray,
    source: Dataset,
    *,
    instance_number: int,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    contributing_equipment: hd.ContributingEquipment,
) -> hd.sc.SCImage:
    """SC image of ``picture`` (rows x columns x 3, uint8), in ``source``'s study.

    The picture has the source's pixel grid, so the source's PatientOrientation applies to it
    unchanged; when the source has none the attribute stays empty rather than guessed.
    """
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise OutputError("secondary capture picture must be rows x columns x 3 uint8 (RGB)")
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=picture,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            patient_orientation=_PLACEHOLDER_ORIENTATION,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            contributing_equipment=[contributing_equipment],
            series_description=SERIES_DESCRIPTION_SC,
            manufacturer_model_name="cxr-audit-agent",
            software_versions=agent_version(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"secondary capture could not be built: {exc}") from exc
    sc.PatientOrientation = source.get("PatientOrientation", "")
    sc.BurnedInAnnotation = "YES"
    copy_body_part(source, sc)
    return sc
