"""Mapping boxes between the model's input image and the source pixel grid.

``pixels.py`` (in ``dicom_agent``) resizes the source with its aspect ratio kept and pads it to the
model's input size; the model answers in normalised coordinates of that padded input. This module
inverts the mapping exactly, so a box lands on the source image's pixels (PS3.3 C.18.6.1.1 puts the
origin at the top-left corner of the top-left pixel, which is what these float coordinates use).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxr_auditor.schema import Box, PixelBox


class Geometry(BaseModel):
    """Where the source image sits inside the model input.

    ``content_*`` give the rectangle (in input pixels) that holds the resized source; the rest is
    padding. For an image fed unchanged, the content rectangle is the whole input.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_width: int = Field(gt=0)
    source_height: int = Field(gt=0)
    input_width: int = Field(gt=0)
    input_height: int = Field(gt=0)
    content_left: float = Field(ge=0)
    content_top: float = Field(ge=0)
    content_width: float = Field(gt=0)
    content_height: float = Field(gt=0)

    @model_validator(mode="after")
    def _inside(self) -> Geometry:
        eps = 1e-6
        if self.content_left + self.content_width > self.input_width + eps:
            raise ValueError("content rectangle exceeds input width")
        if self.content_top + self.content_height > self.input_height + eps:
            raise ValueError("content rectangle exceeds input height")
        return self

    @classmethod
    def identity(cls, width: int, height: int) -> Geometry:
        return cls(
            source_width=width,
            source_height=height,
            input_width=width,
            input_height=height,
            content_left=0,
            content_top=0,
            content_width=width,
            content_height=height,
        )

    @classmethod
    def letterbox(cls, width: int, height: int, size: int) -> Geometry:
        """Aspect-preserving fit of ``width`` x ``height`` into a ``size`` square, centred."""
        scale = size / max(width, height)
        cw, ch = width * scale, height * scale
        return cls(
            source_width=width,
            source_height=height,
            input_width=size,
            input_height=size,
            # max(): the long side fills the square, but size - side * (size / side) can be -1e-14
            content_left=max((size - cw) / 2, 0.0),
            content_top=max((size - ch) / 2, 0.0),
            content_width=cw,
            content_height=ch,
        )

    def to_source(self, box: Box) -> PixelBox | None:
        """Model-input normalised box -> source pixel box (clipped); None if it lies in padding."""
        sx = self.source_width / self.content_width
        sy = self.source_height / self.content_height

        def col(x: float) -> float:
            return min(max((x * self.input_width - self.content_left) * sx, 0.0), self.source_width)

        def row(y: float) -> float:
            return min(max((y * self.input_height - self.content_top) * sy, 0.0), self.source_height)

        x0, x1, y0, y1 = col(box.x0), col(box.x1), row(box.y0), row(box.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return PixelBox(x0=x0, y0=y0, x1=x1, y1=y1)

    def from_source(self, pbox: PixelBox) -> Box:
        """Source pixel box -> model-input normalised box (the inverse of :meth:`to_source`)."""
        sx = self.content_width / self.source_width
        sy = self.content_height / self.source_height
        return Box(
            x0=(pbox.x0 * sx + self.content_left) / self.input_width,
            x1=(pbox.x1 * sx + self.content_left) / self.input_width,
            y0=(pbox.y0 * sy + self.content_top) / self.input_height,
            y1=(pbox.y1 * sy + self.content_top) / self.input_height,
        )
