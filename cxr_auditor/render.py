"""Overlay pictures: the audited image with its boxes, flags and a research-only banner.

Boxes are coloured by what the audit says about them: urgent red, missing from the draft amber,
supported by the draft green, and blue for findings that were not compared with a draft
(image-only audits). Claims without a box (unsupported or hedged draft statements, findings the
model could not localise, laterality conflicts) are listed in a legend, because a picture that
silently drops them would look cleaner than the audit is. Every picture carries the banner.

The style decisions (:func:`box_style`, :func:`box_caption`) are public so the DICOM
presentation state can colour its graphic layers the same way.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr_auditor.grounding.fake import STAND_IN, is_stand_in
from cxr_auditor.labels import Label
from cxr_auditor.schema import AuditResult, DraftStatus, Flag, FlagKind, ImageFinding

BANNER_TEXT = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS - AI DRAFT AUDIT"


class BoxStyle(StrEnum):
    """How a box is drawn, in decreasing priority."""

    URGENT = "urgent"
    MISSING = "missing"
    SUPPORTED = "supported"
    FINDING = "finding"


COLOURS: dict[BoxStyle, tuple[int, int, int]] = {
    BoxStyle.URGENT: (230, 40, 40),
    BoxStyle.MISSING: (255, 176, 0),
    BoxStyle.SUPPORTED: (40, 200, 90),
    BoxStyle.FINDING: (70, 150, 255),
}

SHORT_NAMES: dict[Label, str] = {
    Label.PLEURAL_EFFUSION: "Effusion",
    Label.PNEUMOTHORAX: "Pneumothorax",
    Label.LUNG_OPACITY_CONSOLIDATION: "Opacity",
    Label.NODULE_MASS: "Nodule/mass",
    Label.CARDIOMEGALY: "Cardiomegaly",
    Label.NO_FINDING: "No finding",
}

#: The legend wording of each box style (overlay pictures and the results browser).
KEY_NAMES: dict[BoxStyle, str] = {
    BoxStyle.URGENT: "urgent",
    BoxStyle.MISSING: "missing in draft",
    BoxStyle.SUPPORTED: "in draft",
    BoxStyle.FINDING: "AI finding",
}
_BANNER_BG = (170, 0, 0)
_WHITE = (255, 255, 255)
_LEGEND_BG = (0, 0, 0, 170)


def flags_for(result: AuditResult, label: Label, image_index: int) -> list[Flag]:
    """The flags about ``label`` that apply to image ``image_index`` (no indices = all images)."""
    return [
        f
        for f in result.flags
        if f.label is label and (not f.image_indices or image_index in f.image_indices)
    ]


def box_style(result: AuditResult, finding: ImageFinding) -> BoxStyle:
    """The style of ``finding``'s box: urgent, then missing, then draft-supported, else plain."""
    kinds = {f.kind for f in flags_for(result, finding.label, finding.image_index)}
    if FlagKind.URGENT in kinds:
        return BoxStyle.URGENT
    if FlagKind.MISSING in kinds:
        return BoxStyle.MISSING
    asserted = any(
        d.label is finding.label and d.status is DraftStatus.PRESENT for d in result.draft.findings
    )
    return BoxStyle.SUPPORTED if asserted else BoxStyle.FINDING


def box_caption(result: AuditResult, finding: ImageFinding) -> str:
    """Short caption: label, the audit verdict and the model confidence when it gave one."""
    style = box_style(result, finding)
    verdict = {
        BoxStyle.URGENT: "URGENT",
        BoxStyle.MISSING: "MISSING in draft",
        BoxStyle.SUPPORTED: "in draft",
        BoxStyle.FINDING: "AI",
    }[style]
    caption = f"{SHORT_NAMES[finding.label]}: {verdict}"
    if style is BoxStyle.URGENT and any(
        f.kind is FlagKind.MISSING for f in flags_for(result, finding.label, finding.image_index)
    ):
        caption += ", MISSING"
    if finding.confidence is not None:
        caption += f" {round(finding.confidence * 100)}%"
    return caption


def boxed_findings(result: AuditResult, image_index: int) -> list[ImageFinding]:
    """Findings of ``image_index`` that carry a source-pixel box, in result order."""
    return [
        f
        for f in result.grounding.findings
        if f.image_index == image_index and f.pixel_box is not None
    ]


def legend_lines(result: AuditResult, image_index: int) -> list[str]:
    """Text lines for what a box cannot show on ``image_index``."""
    lines: list[str] = []
    if is_stand_in(result.models):  # a demo or a dry run must never pass for a model's reading
        lines.append(f"{STAND_IN.upper()}: canned findings for demos and tests")
    if result.grounding.state.value != "ok":
        lines.append(f"Image analysis {result.grounding.state.value}: no findings, no flags")
    for f in result.grounding.findings:
        if f.image_index != image_index or f.pixel_box is not None:
            continue
        if f.label is Label.NO_FINDING:
            lines.append("AI: no finding on this image")
        else:
            lines.append(f"{box_caption(result, f)} (not localised)")
    for flag in result.flags:
        if flag.image_indices and image_index not in flag.image_indices:
            continue
        name = SHORT_NAMES[flag.label]
        if flag.kind is FlagKind.UNSUPPORTED:
            lines.append(f"UNSUPPORTED draft claim: {name} (not seen by AI)")
        elif flag.kind is FlagKind.HEDGED:
            lines.append(f"HEDGED in draft: {name}")
        elif flag.kind is FlagKind.LATERALITY:
            lines.append(f"LATERALITY conflict: {name}")
    if result.mode.value != "full":
        lines.append(f"Audit mode: {result.mode.value.replace('_', ' ')} (no draft comparison)")
    return lines


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_overlay(
    image: np.ndarray | Image.Image, result: AuditResult, image_index: int
) -> Image.Image:
    """Draw ``result``'s boxes, captions, legend and the banner on ``image`` (8-bit).

    ``image`` is the windowed picture at the source image's resolution (rows x columns, grey or
    RGB); pixel boxes are in that grid, so no scaling happens here. Returns a new RGB image.
    """
    base = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    canvas = base.convert("RGB")
    width, height = canvas.size
    unit = max(min(width, height) / 100.0, 4.0)
    font = _font(max(int(unit * 2.2), 10))
    line_width = max(int(unit / 3), 2)
    draw = ImageDraw.Draw(canvas)

    for finding in boxed_findings(result, image_index):
        pb = finding.pixel_box
        assert pb is not None  # boxed_findings keeps only boxed findings
        colour = COLOURS[box_style(result, finding)]
        draw.rectangle((pb.x0, pb.y0, pb.x1 - 1, pb.y1 - 1), outline=colour, width=line_width)
        caption = box_caption(result, finding)
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tx = min(max(pb.x0, 0), max(width - (right - left) - 2, 0))
        ty = pb.y0 - (bottom - top) - 2 * line_width
        if ty < 0:  # no room above the box: put the caption inside its top edge
            ty = pb.y0 + line_width
        draw.rectangle((tx, ty, tx + right - left + 4, ty + bottom + 2), fill=(0, 0, 0))
        draw.text((tx + 2, ty), caption, fill=colour, font=font)

    _draw_legend(canvas, legend_lines(result, image_index), font, unit)
    _draw_banner(canvas, font, unit)
    return canvas


def _draw_banner(canvas: Image.Image, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, unit: float) -> None:
    draw = ImageDraw.Draw(canvas)
    _, top, right, bottom = draw.textbbox((0, 0), BANNER_TEXT, font=font)
    pad = int(unit)
    draw.rectangle((0, 0, canvas.size[0], bottom + 2 * pad), fill=_BANNER_BG)
    draw.text(((canvas.size[0] - right) / 2, pad), BANNER_TEXT, fill=_WHITE, font=font)


def _draw_legend(
    canvas: Image.Image,
    lines: list[str],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    unit: float,
) -> None:
    key = [(COLOURS[s], KEY_NAMES[s]) for s in BoxStyle]
    draw = ImageDraw.Draw(canvas)
    line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + int(unit / 2)
    pad = int(unit)
    rows = 1 + len(lines)
    top = canvas.size[1] - rows * line_h - 2 * pad
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle((0, top, canvas.size[0], canvas.size[1]), fill=_LEGEND_BG)
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(canvas)
    x, y = pad, top + pad
    for colour, name in key:
        draw.rectangle((x, y + line_h * 0.2, x + line_h * 0.6, y + line_h * 0.8), fill=colour)
        x += int(line_h * 0.8)
        draw.text((x, y), name, fill=_WHITE, font=font)
        x += int(draw.textlength(name, font=font) + line_h)
    for line in lines:
        y += line_h
        draw.text((pad, y), line, fill=_WHITE, font=font)
