"""The audit's boxes as a Grayscale Softcopy Presentation State (PS3.3 A.33.1) on the source.

Viewers that render presentation states (Weasis, OsiriX) draw the boxes and short captions over
the original image. Each box style of :mod:`cxr_auditor.render` (urgent, missing, supported,
plain finding) is its own graphic layer with the same colour as the pictures (Graphic Layer
Recommended Display CIELab Value, PS3.3 C.10.7). A disclaimer and the legend lines are text
objects in display units on their own layer.

Pitfalls handled (OUTPUTS.md §3.7): the VOI window is passed explicitly, its explanation as a
one-item list (highdicom 0.28 stores a plain string one character per value, whether copied
from the source or passed in), and BodyPartExamined is copied from the source (without it
dciodvfy flags the Type 2C Laterality).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from cxr_auditor import render
from cxr_auditor.render import BoxStyle
from cxr_auditor.schema import AuditResult
from dicom_agent.errors import OutputError
from dicom_agent.outputs.common import (
    MANUFACTURER,
    agent_version,
    box_polyline,
    contributing_equipment,
    copy_body_part,
    device_uid,
    referenced_frames,
)

CONTENT_LABEL = "AI_AUDIT_RSRCH"  # CS, 16 characters at most
CONTENT_DESCRIPTION = "AI draft audit - RESEARCH USE ONLY - not for diagnosis"
SERIES_DESCRIPTION_GSPS = "AI AUDIT GSPS - RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
_TEXT_LAYER = "AUDIT_TEXT"


def _layers() -> dict[BoxStyle, hd.pr.GraphicLayer]:
    return {
        style: hd.pr.GraphicLayer(
            layer_name=style.value.upper(),
            order=order,
            description=f"AI audit boxes: {style.value}",
            display_color=hd.color.CIELabColor.from_rgb(*render.COLOURS[style]),
        )
        for order, style in enumerate(BoxStyle, start=1)
    }


def _voi(
    source: Dataset, window: tuple[float, float] | None
) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The window the pictures were made with, else the source's first window, else none."""
    if window is None and "WindowCenter" in source and "WindowWidth" in source:
        centers, widths = source.WindowCenter, source.WindowWidth
        window = (
            float(centers[0] if isinstance(centers, Sequence) else centers),
            float(widths[0] if isinstance(widths, Sequence) else widths),
        )
    if window is None:
        return None
    center, width = window
    return [
        # One-item lists throughout: highdicom 0.28 stores a plain-str explanation one character
        # per value (list(str)), and a list explanation needs list centre and width.
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=[float(center)],
            window_width=[max(float(width), 1.0)],
            window_explanation=["AI audit display window"],
        )
    ]


def _box_annotations(
    result: AuditResult,
    image_index: int,
    source: Dataset,
    layers: dict[BoxStyle, hd.pr.GraphicLayer],
    frame_number: int | None,
) -> list[hd.pr.GraphicAnnotation]:
    """One annotation per box style in use: the boxes as closed polylines with their captions."""
    by_style: dict[BoxStyle, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]] = {}
    for finding in render.boxed_findings(result, image_index):
        graphics, texts = by_style.setdefault(render.box_style(result, finding), ([], []))
        points = box_polyline(finding)
        graphics.append(
            hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=points, units="PIXEL")
        )
        texts.append(
            hd.pr.TextObject(
                text_value=render.box_caption(result, finding),
                units="PIXEL",
                anchor_point=(float(points[0][0]), float(points[0][1])),
                anchor_point_visible=False,
                text_justification="LEFT",
            )
        )
    return [
        hd.pr.GraphicAnnotation(
            referenced_images=[source],
            graphic_layer=layers[style],
            referenced_frame_number=frame_number,
            graphic_objects=graphics,
            text_objects=texts,
        )
        for style, (graphics, texts) in by_style.items()
    ]


def _text_annotation(
    result: AuditResult,
    image_index: int,
    source: Dataset,
    text_layer: hd.pr.GraphicLayer,
    frame_number: int | None,
) -> hd.pr.GraphicAnnotation:
    """The research-only banner and the legend lines, in display units down the left side."""
    lines = [render.BANNER_TEXT, *render.legend_lines(result, image_index)]
    step = min(0.05, 0.9 / len(lines))
    texts = [
        hd.pr.TextObject(
            text_value=line[:1024],
            units="DISPLAY",
            bounding_box=(0.02, 0.02 + i * step, 0.98, 0.02 + (i + 1) * step),
            text_justification="LEFT",
        )
        for i, line in enumerate(lines)
    ]
    return hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=text_layer,
        referenced_frame_number=frame_number,
        text_objects=texts,
    )


def build_gsps(
    result: AuditResult,
    image_index: int,
    source: Dataset,
    *,
    window: tuple[float, float] | None,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """GSPS with ``result``'s boxes on image ``image_index`` (whose dataset is ``source``).

    ``window`` is the (center, width) VOI window of the display picture, in modality-LUT output
    units; a MONOCHROME1 source gets an INVERSE presentation LUT so it displays like the picture.
    """
    layers = _layers()
    frames = referenced_frames(result, image_index, source)
    frame_number = frames[0] if frames else None
    text_layer = hd.pr.GraphicLayer(
        layer_name=_TEXT_LAYER, order=len(layers) + 1, description="Disclaimer and audit legend",
        display_color=hd.color.CIELabColor.from_rgb(255, 255, 255),
    )
    annotations = [
        *_box_annotations(result, image_index, source, layers, frame_number),
        _text_annotation(result, image_index, source, text_layer, frame_number),
    ]
    presentation_lut = None
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        presentation_lut = hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
        )
    try:
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=result.result_version,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="cxr-audit-agent",
            software_versions=agent_version(),
            device_serial_number=device_uid(result),
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            graphic_annotations=annotations,
            graphic_layers=[*layers.values(), text_layer],
            voi_lut_transformations=_voi(source, window),
            presentation_lut_transformation=presentation_lut,
            series_description=SERIES_DESCRIPTION_GSPS,
            contributing_equipment=[contributing_equipment(result)],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"GSPS could not be built: {exc}") from exc
    copy_body_part(source, gsps)
    return gsps
