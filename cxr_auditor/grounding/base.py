"""The grounder interface: a batch of images in, one parsed result per image out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from PIL import Image

from cxr_auditor.geometry import Geometry
from cxr_auditor.schema import GroundingResult, ModelInfo


@dataclass(frozen=True)
class ImageInput:
    """One image ready for the model (already windowed, 8-bit), with its geometry.

    ``image_index`` is the position in the study's ``inputs.images``; findings the grounder
    returns carry it. ``patient_left_on_image_right`` is True for a standard PA/AP display, False
    when the orientation says otherwise, None when unknown (then no laterality is derived).
    """

    image: Image.Image
    image_index: int
    geometry: Geometry
    patient_left_on_image_right: bool | None = True
    meta: dict[str, str] = field(default_factory=dict)


class Grounder(ABC):
    """Turns images into findings. Implementations: transformers, openai, fake."""

    #: provenance of the model this grounder runs
    info: ModelInfo

    @abstractmethod
    def ground(self, images: list[ImageInput]) -> list[GroundingResult]:
        """Return one GroundingResult per input image, in order. Must not raise on bad model
        output (that is a ``failed`` result); may raise BackendError when the backend itself
        fails (the worker retries the job)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release model resources."""
