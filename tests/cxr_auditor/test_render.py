"""Overlay pictures: banner on every picture, boxes coloured by flag, legend for the rest."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_auditor.labels import Label
from cxr_auditor.render import (
    BANNER_TEXT,
    COLOURS,
    BoxStyle,
    box_caption,
    box_style,
    legend_lines,
    render_overlay,
)
from cxr_auditor.schema import (
    AuditMode,
    AuditResult,
    DraftFinding,
    DraftResult,
    DraftState,
    DraftStatus,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    ImageFinding,
    PixelBox,
)

WIDTH, HEIGHT = 400, 500


def _finding(label: Label, box: tuple[float, float, float, float] | None, **kw: object) -> ImageFinding:
    pixel_box = None if box is None else PixelBox(x0=box[0], y0=box[1], x1=box[2], y1=box[3])
    return ImageFinding(label=label, pixel_box=pixel_box, **kw)  # type: ignore[arg-type]


def _result(
    findings: list[ImageFinding],
    flags: list[Flag],
    draft: list[DraftFinding] | None = None,
    mode: AuditMode = AuditMode.FULL,
    state: GroundingState = GroundingState.OK,
) -> AuditResult:
    return AuditResult(
        grounding=GroundingResult(state=state, findings=findings),
        draft=DraftResult(state=DraftState.PARSED, findings=draft or []),
        mode=mode,
        comparator_version="c1",
        flags=flags,
    )


URGENT_BOX = (40.0, 100.0, 160.0, 220.0)
MISSING_BOX = (220.0, 120.0, 340.0, 260.0)
SUPPORTED_BOX = (120.0, 300.0, 300.0, 420.0)


def _mixed() -> AuditResult:
    return _result(
        [
            _finding(Label.PNEUMOTHORAX, URGENT_BOX, confidence=0.8),
            _finding(Label.PLEURAL_EFFUSION, MISSING_BOX),
            _finding(Label.CARDIOMEGALY, SUPPORTED_BOX),
        ],
        [
            Flag(kind=FlagKind.URGENT, label=Label.PNEUMOTHORAX, rationale="r", missed=True),
            Flag(kind=FlagKind.MISSING, label=Label.PNEUMOTHORAX, rationale="r"),
            Flag(kind=FlagKind.MISSING, label=Label.PLEURAL_EFFUSION, rationale="r"),
            Flag(kind=FlagKind.UNSUPPORTED, label=Label.NODULE_MASS, rationale="r"),
            Flag(kind=FlagKind.HEDGED, label=Label.LUNG_OPACITY_CONSOLIDATION, rationale="r"),
        ],
        draft=[DraftFinding(label=Label.CARDIOMEGALY, status=DraftStatus.PRESENT, span="big heart", start=0, end=9)],
    )


def _grey() -> np.ndarray:
    return np.full((HEIGHT, WIDTH), 90, np.uint8)


class TestStyles:
    def test_priority_urgent_missing_supported_plain(self) -> None:
        result = _mixed()
        styles = [box_style(result, f) for f in result.grounding.findings]
        assert styles == [BoxStyle.URGENT, BoxStyle.MISSING, BoxStyle.SUPPORTED]
        image_only = _result([_finding(Label.CARDIOMEGALY, SUPPORTED_BOX)], [], mode=AuditMode.IMAGE_ONLY)
        assert box_style(image_only, image_only.grounding.findings[0]) is BoxStyle.FINDING

    def test_captions_are_short_and_carry_verdict_and_confidence(self) -> None:
        result = _mixed()
        assert box_caption(result, result.grounding.findings[0]) == "Pneumothorax: URGENT, MISSING 80%"
        assert box_caption(result, result.grounding.findings[1]) == "Effusion: MISSING in draft"
        assert box_caption(result, result.grounding.findings[2]) == "Cardiomegaly: in draft"

    def test_flag_on_another_image_does_not_colour_this_box(self) -> None:
        result = _result(
            [_finding(Label.PNEUMOTHORAX, URGENT_BOX, image_index=0)],
            [Flag(kind=FlagKind.URGENT, label=Label.PNEUMOTHORAX, rationale="r", image_indices=[1])],
        )
        assert box_style(result, result.grounding.findings[0]) is BoxStyle.FINDING

    def test_legend_lists_unsupported_hedged_and_unlocalised(self) -> None:
        result = _mixed()
        result = result.model_copy(
            update={"grounding": GroundingResult(
                state=GroundingState.OK,
                findings=[*result.grounding.findings, _finding(Label.NODULE_MASS, None)],
            )}
        )
        lines = legend_lines(result, 0)
        assert "UNSUPPORTED draft claim: Nodule/mass (not seen by AI)" in lines
        assert "HEDGED in draft: Opacity" in lines
        assert "Nodule/mass: AI (not localised)" in lines

    def test_legend_says_when_grounding_failed(self) -> None:
        lines = legend_lines(_result([], [], mode=AuditMode.NO_FLAGS, state=GroundingState.FAILED), 0)
        assert lines[0] == "Image analysis failed: no findings, no flags"


class TestRenderOverlay:
    @pytest.mark.parametrize("image", [_grey(), np.stack([_grey()] * 3, axis=-1)])
    def test_keeps_size_and_draws_banner_and_box_colours(self, image: np.ndarray) -> None:
        picture = np.asarray(render_overlay(image, _mixed(), 0))
        assert picture.shape == (HEIGHT, WIDTH, 3)
        assert tuple(picture[1, 1]) == (170, 0, 0)  # banner background
        assert tuple(picture[1, WIDTH - 2]) == (170, 0, 0)
        x0, y0, x1, y1 = (int(v) for v in URGENT_BOX)
        assert tuple(picture[(y0 + y1) // 2, x0]) == COLOURS[BoxStyle.URGENT]
        x0, y0, x1, y1 = (int(v) for v in MISSING_BOX)
        assert tuple(picture[(y0 + y1) // 2, x1 - 1]) == COLOURS[BoxStyle.MISSING]
        x0, y0, x1, y1 = (int(v) for v in SUPPORTED_BOX)
        assert tuple(picture[y1 - 1, (x0 + x1) // 2]) == COLOURS[BoxStyle.SUPPORTED]

    def test_banner_is_drawn_even_without_findings(self) -> None:
        picture = np.asarray(render_overlay(_grey(), _result([], []), 0)).astype(int)
        rows = int(np.argmin((picture[:, 0] == (170, 0, 0)).all(axis=-1)))  # banner height
        assert rows >= 10
        banner = picture[:rows]
        assert (banner == (170, 0, 0)).all(axis=-1).mean() > 0.5
        assert (banner.min(axis=-1) > 200).sum() > 50  # white banner text
        assert "RESEARCH USE ONLY" in BANNER_TEXT
