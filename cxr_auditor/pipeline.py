"""The audit pipeline: images and draft text in, one :class:`AuditResult` per study out.

:class:`Auditor` audits a batch of studies with ONE grounder call over all their images (the
worker batches across jobs so the GPU sees full batches), then, per study: places each box on
the source pixels (:meth:`~cxr_auditor.geometry.Geometry.to_source`) and names the patient side
it lies on, merges the per-image results into one study result, parses the draft and runs the
comparator (CONTRACT.md "Comparator", "AuditResult").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cxr_auditor.classification import PatencyClassifier, summarize
from cxr_auditor.comparator import COMPARATOR_VERSION, compare
from cxr_auditor.drafts.base import DraftParser
from cxr_auditor.errors import BackendError
from cxr_auditor.grounding.base import Grounder, ImageInput
from cxr_auditor.labels import DEFAULT_URGENT, Label, parse_urgent
from cxr_auditor.schema import (
    AuditMode,
    AuditResult,
    DraftResult,
    DraftState,
    GroundingResult,
    GroundingState,
    ImageFinding,
    ImageRef,
    Inputs,
    Laterality,
    ModelInfo,
    PixelBox,
    StudyKeys,
)

__all__ = [
    "MIDLINE_BAND",
    "AuditItem",
    "Auditor",
    "ClassificationAuditor",
    "box_laterality",
    "merge_grounding",
    "place_findings",
]

logger = logging.getLogger(__name__)

#: Width, as a fraction of the image, of the central band where a box centre names no side: a
#: heart or mediastinal box straddles the midline and has no laterality.
MIDLINE_BAND = 0.10


@dataclass
class AuditItem:
    """One study to audit.

    ``images`` are the model inputs; each one's ``image_index`` points into ``image_refs`` (the
    ``inputs.images`` of the result). ``draft_text`` None or blank means no draft.
    """

    images: list[ImageInput]
    image_refs: list[ImageRef]
    draft_text: str | None
    study: StudyKeys
    draft_file: str | None = None
    draft_sha256: str | None = None
    skipped_images: list[dict[str, str]] = field(default_factory=list)
    result_version: int = 1

    def __post_init__(self) -> None:
        n = len(self.image_refs)
        if any(not 0 <= image.image_index < n for image in self.images):
            raise ValueError("every ImageInput.image_index must index into image_refs")

    def __repr__(self) -> str:  # the draft and study keys are PHI: keep them out of logs
        return f"AuditItem(images={len(self.images)}, draft={self.draft_text is not None})"

    def inputs(self) -> Inputs:
        """The ``inputs`` block of this study's result."""
        return Inputs(
            images=self.image_refs,
            skipped_images=self.skipped_images,
            draft_file=self.draft_file,
            draft_sha256=self.draft_sha256,
        )


def box_laterality(
    pixel_box: PixelBox, source_width: int, patient_left_on_image_right: bool | None
) -> Laterality | None:
    """Patient side of a box from its horizontal centre on the source image.

    ``patient_left_on_image_right`` is True for the standard display of a PA or AP view (the
    patient faces the viewer), False when the orientation says the image is flipped, None when
    it is unknown. A centre within :data:`MIDLINE_BAND` of the middle, or an unknown
    orientation, gives None.
    """
    if patient_left_on_image_right is None:
        return None
    centre = (pixel_box.x0 + pixel_box.x1) / 2 / source_width
    if abs(centre - 0.5) < MIDLINE_BAND / 2:
        return None
    on_image_right = centre > 0.5
    if on_image_right == patient_left_on_image_right:
        return Laterality.LEFT
    return Laterality.RIGHT


def place_findings(result: GroundingResult, image: ImageInput) -> GroundingResult:
    """Give each boxed finding of one image its source pixel box and patient side.

    Recomputed from the normalised box whatever the grounder filled in, so every grounder gets
    the same geometry. A box wholly in the letterbox padding keeps its normalised box, gets no
    pixel box and leaves the note ``box_in_padding``. A finding without a box keeps the
    laterality its grounder gave it (a report-style model may state the side in words).
    """
    notes = list(result.notes)
    placed: list[ImageFinding] = []
    for finding in result.findings:
        update: dict[str, object] = {"image_index": image.image_index}
        if finding.box is not None:
            pixel = image.geometry.to_source(finding.box)
            if pixel is None:
                notes.append("box_in_padding")
            update["pixel_box"] = pixel
            update["laterality"] = (
                None
                if pixel is None
                else box_laterality(
                    pixel, image.geometry.source_width, image.patient_left_on_image_right
                )
            )
        placed.append(finding.model_copy(update=update))
    return result.model_copy(update={"findings": placed, "notes": notes})


# The best per-image state decides the study's: one usable view makes the study auditable.
_STATE_PRECEDENCE = (
    GroundingState.OK,
    GroundingState.INCONCLUSIVE,
    GroundingState.FAILED,
    GroundingState.SKIPPED,
)


def merge_grounding(results: list[GroundingResult], images: list[ImageInput]) -> GroundingResult:
    """One study result from its per-image results (already placed).

    State: ``ok`` if any image is ok, else ``inconclusive`` if any is, else ``failed`` if any
    is, else ``skipped`` (also when the study has no image). Findings of ok images are concatenated;
    ``no_finding`` on one image next to positives on another is dropped with a note. Per-image
    notes are prefixed ``image<index>:``, and each image that is not ok adds
    ``image<index>:grounding_<state>``. ``raw_text`` is kept only when the study failed.
    """
    if not results:
        return GroundingResult(state=GroundingState.SKIPPED, notes=["no_images"])
    states = {r.state for r in results}
    state = next(s for s in _STATE_PRECEDENCE if s in states)
    findings: list[ImageFinding] = []
    unmapped: list[str] = []
    notes: list[str] = []
    for result, image in zip(results, images, strict=True):
        prefix = f"image{image.image_index}:"
        notes.extend(prefix + note for note in result.notes)
        if result.state is GroundingState.OK:
            findings.extend(result.findings)
        else:
            notes.append(f"{prefix}grounding_{result.state.value}")
        unmapped.extend(u for u in result.unmapped if u not in unmapped)
    positives = [f for f in findings if f.label is not Label.NO_FINDING]
    if positives and len(positives) < len(findings):
        findings = positives
        notes.append("no_finding_with_positives:positives_kept")
    reports = [r.report_text for r in results if r.report_text]
    raw = next((r.raw_text for r in results if r.raw_text), None)
    return GroundingResult(
        state=state,
        findings=findings if state is GroundingState.OK else [],
        unmapped=unmapped,
        notes=notes,
        raw_text=raw if state is GroundingState.FAILED else None,
        attempts=max(r.attempts for r in results),
        report_text="\n\n".join(reports) if reports else None,
    )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


class Auditor:
    """Runs the audit for batches of studies with one grounder and an optional draft parser.

    ``urgent`` accepts labels or their plain strings (a configured list); it is validated with
    :func:`~cxr_auditor.labels.parse_urgent`.
    """

    def __init__(
        self,
        grounder: Grounder,
        draft_parser: DraftParser | None,
        urgent: Iterable[Label | str] = DEFAULT_URGENT,
    ) -> None:
        self.grounder = grounder
        self.draft_parser = draft_parser
        self.urgent: frozenset[Label] = parse_urgent(frozenset(urgent))

    def audit(self, item: AuditItem) -> AuditResult:
        """Audit one study (a batch of one)."""
        (result,) = self.audit_batch([item])
        return result

    def audit_batch(self, items: list[AuditItem]) -> list[AuditResult]:
        """Audit several studies with one grounder call over all their images.

        ``timings`` holds the wall time in ms of each stage: ``grounding_ms`` and
        ``draft_parsing_ms`` are the batch calls every item of the batch waited for,
        ``comparison_ms`` is the item's own.

        Raises:
            BackendError: the grounder or draft parser failed (the worker retries the job), or
                the grounder returned the wrong number of results.
        """
        images = [image for item in items for image in item.images]
        start = time.perf_counter()
        per_image = self.grounder.ground(images) if images else []
        grounding_ms = _ms(start)
        if len(per_image) != len(images):
            raise BackendError(
                f"grounder returned {len(per_image)} results for {len(images)} images"
            )

        start = time.perf_counter()
        drafts = self._parse_drafts(items)
        draft_ms = _ms(start)

        out: list[AuditResult] = []
        offset = 0
        for item, draft in zip(items, drafts, strict=True):
            mine = per_image[offset : offset + len(item.images)]
            offset += len(item.images)
            placed = [place_findings(r, image) for r, image in zip(mine, item.images, strict=True)]
            grounding = merge_grounding(placed, item.images)
            start = time.perf_counter()
            mode, flags, notes = compare(grounding, draft, urgent=self.urgent)
            compare_ms = _ms(start)
            out.append(
                AuditResult(
                    study=item.study,
                    result_version=item.result_version,
                    inputs=item.inputs(),
                    models=self._models(draft),
                    grounding=grounding,
                    draft=draft,
                    mode=mode,
                    comparator_version=COMPARATOR_VERSION,
                    flags=flags,
                    timings={
                        "grounding_ms": grounding_ms,
                        "draft_parsing_ms": draft_ms,
                        "comparison_ms": compare_ms,
                    },
                    notes=notes,
                )
            )
        logger.debug(
            "audited %d studies (%d images): grounding %.1f ms, drafts %.1f ms",
            len(items),
            len(images),
            grounding_ms,
            draft_ms,
        )
        return out

    def _parse_drafts(self, items: list[AuditItem]) -> list[DraftResult]:
        """One DraftResult per item; the parser sees only the non-blank drafts, in one call."""
        results: list[DraftResult | None] = [None] * len(items)
        todo = [i for i, item in enumerate(items) if item.draft_text and item.draft_text.strip()]
        if self.draft_parser is not None and todo:
            parsed = self.draft_parser.parse_many([items[i].draft_text or "" for i in todo])
            for i, result in zip(todo, parsed, strict=True):
                results[i] = result
        # A blank draft is no draft; a draft with no parser configured is not parsed either.
        return [
            r
            if r is not None
            else DraftResult(
                state=DraftState.NONE, notes=["no_draft_parser" if i in todo else "no_draft"]
            )
            for i, r in enumerate(results)
        ]

    def close(self) -> None:
        """Release the grounder and the draft parser (an LLM parser holds a model or client).

        Both are closed even when the first one fails; the first error is raised after.
        """
        try:
            self.grounder.close()
        finally:
            if self.draft_parser is not None:
                self.draft_parser.close()

    def _models(self, draft: DraftResult) -> list[ModelInfo]:
        models = [self.grounder.info]
        if self.draft_parser is not None and draft.state is not DraftState.NONE:
            models.append(self.draft_parser.info)
        return models


class ClassificationAuditor:
    """Audits with a classification profile (``dsa-patency`` on XA): one classifier call over
    all images of the batch; the study-level answer goes to ``AuditResult.classification``.

    There is no grounding and no draft comparison, so the mode is ``no_flags``; a blocked
    vessel is URGENT inside ``classification`` (``urgent: true``).
    """

    def __init__(self, classifier: PatencyClassifier) -> None:
        self.classifier = classifier

    def audit_batch(self, items: list[AuditItem]) -> list[AuditResult]:
        images = [image for item in items for image in item.images]
        start = time.perf_counter()
        answers = self.classifier.classify(images) if images else []
        ms = _ms(start)
        out: list[AuditResult] = []
        offset = 0
        for item in items:
            mine = answers[offset : offset + len(item.images)]
            offset += len(item.images)
            out.append(
                AuditResult(
                    study=item.study,
                    result_version=item.result_version,
                    inputs=item.inputs(),
                    models=[self.classifier.info],
                    grounding=GroundingResult(
                        state=GroundingState.SKIPPED, notes=["classification_profile"]
                    ),
                    draft=DraftResult(state=DraftState.NONE, notes=["classification_profile"]),
                    mode=AuditMode.NO_FLAGS,
                    comparator_version=COMPARATOR_VERSION,
                    classification=summarize(self.classifier.profile.name, mine),
                    timings={"classification_ms": ms},
                )
            )
        return out

    def close(self) -> None:
        self.classifier.close()
