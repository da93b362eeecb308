"""The audit as a Comprehensive 3D SR with TID 1500 "Measurement Report" as its root.

Built from highdicom template classes only, so an invalid tree cannot be constructed:

- TID 1500 Measurement Report, observer context TID 1002/1004 (our device, named RESEARCH ONLY),
  procedure reported (LN 43468-8), Image Library (TID 1600) for the audited images;
- one TID 1410 Planar ROI group per box: Finding, Finding Site, a closed 5-point POLYLINE
  SCOORD (111030 "Image Region") in the source image's pixel space, Tracking Identifier and
  UID, Algorithm Identification (TID 4019), Certainty of Finding when the model gave a
  confidence, and the audit flags as ``99CXRAUD`` codes;
- one TID 1501 image-level group per "no finding", per finding without a box and per
  UNSUPPORTED draft claim (Presence of property = Absent plus the flag);
- a TEXT (121106 "Comment") with the disclaimer under the root, and the verbatim draft span in
  each group the draft speaks about.

Design notes and the pitfalls met when validating with dciodvfy and dsrdump are in
``docs/outputs.md`` and ``/work/shared/design/OUTPUTS.md`` §3.2 and §3.7.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset

from cxr_auditor.labels import Label
from cxr_auditor.render import flags_for
from cxr_auditor.schema import (
    AuditResult,
    Flag,
    FlagKind,
    GroundingState,
    ImageFinding,
    Laterality,
)
from dicom_agent.errors import OutputError
from dicom_agent.outputs import codes
from dicom_agent.outputs.common import (
    DEVICE_NAME,
    MANUFACTURER,
    agent_version,
    box_polyline,
    contributing_equipment,
    device_uid,
    grounding_model,
    referenced_frames,
)
from dicom_agent.outputs.uids import derive_uid

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION_SR = "AI DRAFT AUDIT - RESEARCH USE ONLY - NOT FOR DIAGNOSIS"

_PROJECTION_MODALITIES = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}

_LATERALITY: dict[Laterality, CodedConcept] = {  # CID 244
    Laterality.LEFT: CodedConcept("7771000", "SCT", "Left"),
    Laterality.RIGHT: CodedConcept("24028007", "SCT", "Right"),
    Laterality.BILATERAL: CodedConcept("51440002", "SCT", "Right and left"),
}


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm, PixelSpacing before ImagerPixelSpacing; None when absent.

    PixelSpacing is calibrated to the patient; ImagerPixelSpacing is at the detector, so a size
    from it is slightly magnified (PS3.3 C.8.11.4). Never guessed: without either a nodule
    cannot be told from a mass (see :func:`codes.finding_code`).
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def library_entry_possible(ds: Dataset) -> bool:
    """Whether highdicom can describe ``ds`` in the Image Library (TID 1601/1603).

    Its projection-radiography descriptors read PatientOrientation and ImagerPixelSpacing
    without guards; a real DX often lacks one. Such an image is left out of the library rather
    than given invented values; it is still referenced from every group that concerns it.
    """
    if str(ds.get("Modality", "")) not in _PROJECTION_MODALITIES:
        return True
    return bool(ds.get("PatientOrientation")) and bool(ds.get("ImagerPixelSpacing"))


def _flag_evaluations(flags: Sequence[Flag]) -> list[hd.sr.QualitativeEvaluation]:
    out: list[hd.sr.QualitativeEvaluation] = []
    for flag in flags:
        code = codes.FLAG_CODES.get(flag.kind)
        if code is None:  # HEDGED / LATERALITY: sidecar and pictures only, no DICOM concept
            continue
        out.append(hd.sr.QualitativeEvaluation(codes.DRAFT_CONCORDANCE, code))
        if flag.kind is FlagKind.URGENT:
            out.append(
                hd.sr.QualitativeEvaluation(codes.LEVEL_OF_SIGNIFICANCE, codes.HIGHLY_SIGNIFICANT)
            )
    return out


def _draft_spans(result: AuditResult, label: Label) -> list[str]:
    return [d.span for d in result.draft.findings if d.label is label]


def _append_text(group: Template, name: CodedConcept, values: Sequence[str]) -> None:
    # TID 1501/1410 have no slot highdicom fills with free text, so the container is extended
    # with highdicom TEXT items (CONTAINS) after construction.
    for value in values:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=name, value=value, relationship_type="CONTAINS")
        )


def _certainty(finding: ImageFinding) -> list[hd.sr.Measurement]:
    if finding.confidence is None:
        return []
    return [
        hd.sr.Measurement(
            name=codes.CERTAINTY, value=round(finding.confidence * 100.0, 1), unit=codes.PERCENT
        )
    ]


def _finding_site(finding: ImageFinding) -> hd.sr.FindingSite:
    laterality = _LATERALITY.get(finding.laterality) if finding.laterality else None
    return hd.sr.FindingSite(codes.FINDING_SITES[finding.label], laterality=laterality)


def _long_axis_mm(finding: ImageFinding, ds: Dataset) -> float | None:
    spacing = pixel_spacing_mm(ds)
    if spacing is None or finding.pixel_box is None:
        return None
    pb = finding.pixel_box
    return max((pb.x1 - pb.x0) * spacing[1], (pb.y1 - pb.y0) * spacing[0])


class _Builder:
    """Collects the measurement groups of one report; one instance per SR."""

    def __init__(self, result: AuditResult, sources: dict[int, Dataset], sop_uid: str) -> None:
        self.result = result
        self.sources = sources
        self.sop_uid = sop_uid
        self.algorithm = _algorithm(result)
        self.groups: list[
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
            | hd.sr.MeasurementsAndQualitativeEvaluations
        ] = []

    def _tracking(self, text: str) -> hd.sr.TrackingIdentifier:
        n = len(self.groups) + 1
        return hd.sr.TrackingIdentifier(
            uid=derive_uid("tracking", self.sop_uid, str(n)), identifier=f"{text} ({n})"
        )

    def add_box(self, finding: ImageFinding) -> None:
        """TID 1410: one box of one finding on one source image."""
        ds = self.sources[finding.image_index]
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(finding),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=referenced_frames(self.result, finding.image_index, ds),
            ),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(f"AI finding: {finding.label.value}"),
            referenced_region=region,
            finding_type=codes.finding_code(finding.label, _long_axis_mm(finding, ds)),
            finding_category=codes.FINDING_CATEGORY_ABNORMAL,
            algorithm_id=self.algorithm,
            finding_sites=[_finding_site(finding)],
            measurements=_certainty(finding),
            qualitative_evaluations=_flag_evaluations(
                flags_for(self.result, finding.label, finding.image_index)
            ),
        )
        _append_text(group, codes.DRAFT_STATEMENT, _draft_spans(self.result, finding.label))
        self.groups.append(group)

    def _source_images(self, indices: Sequence[int]) -> list[hd.sr.SourceImageForMeasurementGroup]:
        return [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=self.sources[i].SOPClassUID,
                referenced_sop_instance_uid=self.sources[i].SOPInstanceUID,
                referenced_frame_numbers=referenced_frames(self.result, i, self.sources[i]),
            )
            for i in sorted(set(indices))
            if i in self.sources
        ]

    def add_image_level(self, finding: ImageFinding) -> None:
        """TID 1501: "no finding", or a finding the model did not localise."""
        is_normal = finding.label is Label.NO_FINDING
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(f"AI finding: {finding.label.value}"),
            finding_type=codes.finding_code(finding.label),
            finding_category=None if is_normal else codes.FINDING_CATEGORY_ABNORMAL,
            algorithm_id=self.algorithm,
            finding_sites=[_finding_site(finding)],
            measurements=_certainty(finding),
            qualitative_evaluations=_flag_evaluations(
                flags_for(self.result, finding.label, finding.image_index)
            ),
            source_images=self._source_images([finding.image_index]),
        )
        _append_text(group, codes.DRAFT_STATEMENT, _draft_spans(self.result, finding.label))
        self.groups.append(group)

    def add_not_analysed(self, index: int) -> None:
        """TID 1501 without a finding: the algorithm ran on this image and produced nothing usable.

        highdicom needs at least one measurement group, and an audit whose image analysis failed
        must still say which images it concerned and that they are not normal.
        """
        state = self.result.grounding.state.value
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(f"Image analysis {state}"),
            algorithm_id=self.algorithm,
            source_images=self._source_images([index]),
        )
        _append_text(group, codes.COMMENT, [f"Image analysis {state}: no findings computed"])
        self.groups.append(group)

    def add_unsupported(self, flag: Flag) -> None:
        """TID 1501: a draft claim the image analysis did not support (Presence = Absent)."""
        indices = flag.image_indices or list(self.sources)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(f"Draft claim: {flag.label.value}"),
            finding_type=codes.finding_code(flag.label),
            algorithm_id=self.algorithm,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.PRESENCE, codes.ABSENT),
                *_flag_evaluations([flag]),
            ],
            source_images=self._source_images(indices),
        )
        spans = [flag.span] if flag.span else _draft_spans(self.result, flag.label)
        _append_text(group, codes.DRAFT_STATEMENT, spans)
        self.groups.append(group)


def _algorithm(result: AuditResult) -> hd.sr.AlgorithmIdentification:
    name, version, params = grounding_model(result)
    return hd.sr.AlgorithmIdentification(name=name, version=version, parameters=params)


def _observation_context(result: AuditResult) -> hd.sr.ObservationContext:
    """TID 1002/1004: our device, its model, prompt hash and comparator rule-set version."""
    name, version, params = grounding_model(result)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(result),
        name=DEVICE_NAME,
        manufacturer_name=MANUFACTURER,
        # a TEXT item (UT), so the whole provenance fits, unlike the LO ManufacturerModelName
        model_name=f"{name} {version}; " + "; ".join(params),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER, observer_identifying_attributes=device
        )
    )


def build_report_content(result: AuditResult, sources: dict[int, Dataset], sop_uid: str) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of ``result`` (see the module docstring)."""
    builder = _Builder(result, sources, sop_uid)
    for finding in result.grounding.findings:
        if finding.image_index not in sources:
            logger.warning("finding on image %d has no source instance; left out of the SR", finding.image_index)
            continue
        if finding.pixel_box is not None and finding.label is not Label.NO_FINDING:
            builder.add_box(finding)
        else:
            builder.add_image_level(finding)
    for flag in result.flags_of(FlagKind.UNSUPPORTED):
        builder.add_unsupported(flag)
    if result.grounding.state is not GroundingState.OK:
        for index in sorted(sources):
            builder.add_not_analysed(index)

    library = [ds for _, ds in sorted(sources.items()) if library_entry_possible(ds)]
    if len(library) < len(sources):
        logger.info(
            "%d of %d images left out of the SR image library (no PatientOrientation or "
            "ImagerPixelSpacing)",
            len(sources) - len(library),
            len(sources),
        )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=codes.PROCEDURE_XR,
        imaging_measurements=builder.groups or None,
        referenced_images=library or None,
    )
    comments = [result.disclaimer]
    if result.grounding.state is not GroundingState.OK:
        # an empty report must not read as a normal study (CONTRACT.md: never reported as normal)
        comments.append(
            f"Image analysis {result.grounding.state.value}: no findings and no flags were "
            "computed; this is not a normal study."
        )
    for position, text in enumerate(comments):
        report[0].ContentSequence.insert(
            position, hd.sr.TextContentItem(codes.COMMENT, text, relationship_type="CONTAINS")
        )
    return report


def build_sr(
    result: AuditResult,
    sources: dict[int, Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    previous: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR (PS3.3 A.35.13) carrying ``result`` as a TID 1500 report.

    ``sources`` maps image index to the source dataset (headers suffice). Patient and study
    identity come from that evidence. ``previous`` is the SR this one supersedes
    (Predecessor Documents Sequence). Flags: UNVERIFIED, PRELIMINARY, and COMPLETE unless the
    image analysis did not succeed (PARTIAL).
    """
    if not sources:
        raise OutputError("an SR needs at least one source image (sources is empty)")
    evidence = [ds for _, ds in sorted(sources.items())]
    name, version, _ = grounding_model(result)
    try:
        content = build_report_content(result, sources, sop_instance_uid)
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=result.result_version,
            manufacturer=MANUFACTURER,
            is_complete=result.grounding.state is GroundingState.OK,
            is_final=False,
            is_verified=False,
            previous_versions=[previous] if previous is not None else None,
            series_description=SERIES_DESCRIPTION_SR,
            manufacturer_model_name=f"{name} {version}"[:64],
            software_versions=agent_version(),
            coding_schemes=[codes.coding_scheme_identification()],
            contributing_equipment=[contributing_equipment(result)],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"SR could not be built: {exc}") from exc
