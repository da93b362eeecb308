"""The TID 1500 SR: content tree, codes, geometry and header gaps."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from cxr_auditor.geometry import Geometry
from cxr_auditor.labels import Label
from cxr_auditor.schema import (
    DISCLAIMER,
    AuditMode,
    AuditResult,
    Flag,
    FlagKind,
    GroundingResult,
    GroundingState,
    PixelBox,
)
from dicom_agent.outputs import codes
from dicom_agent.outputs.common import MANUFACTURER, referenced_frames
from dicom_agent.outputs.sr import build_report_content, build_sr, library_entry_possible
from dicom_agent.outputs.uids import instance_uid, series_uid
from dicom_agent.outputs.validate import dciodvfy_errors, dsrdump_tree, encode_validated
from tests.support.studies import (
    Study,
    finding,
    findings_result,
    make_study,
    no_finding_result,
    result_for,
    unsupported_result,
)


def _sr(study: Study, result: AuditResult) -> hd.sr.Comprehensive3DSR:
    return build_sr(
        result,
        study.datasets,
        sop_instance_uid=instance_uid(result, "sr"),
        series_instance_uid=series_uid(study.study_uid, "sr"),
        series_number=9901,
    )


def _reread(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(BytesIO(encode_validated(sr)))


def _items(ds: Dataset) -> list[Dataset]:
    """All content items of the tree, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _evaluations(group: hd.sr.Template, name: CodedConcept) -> list[str]:
    """Values of the group's CODE evaluations named ``name`` (matched on value and scheme)."""
    return [
        e.value.value
        for e in group.get_qualitative_evaluations()
        if (e.name.value, e.name.scheme_designator) == (name.value, name.scheme_designator)
    ]


class TestBuildSR:
    def test_document_flags_and_research_marking(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        sr = _reread(_sr(study, findings_result(study)))
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == (
            "UNVERIFIED",
            "PRELIMINARY",
            "COMPLETE",
        )
        assert "VerifyingObserverSequence" not in sr
        assert sr.SeriesNumber == 9901
        assert "RESEARCH USE ONLY" in sr.SeriesDescription
        assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
        first = sr.ContentSequence[0]
        assert first.ConceptNameCodeSequence[0].CodeValue == "121106"
        assert first.TextValue == DISCLAIMER
        scheme = sr.CodingSchemeIdentificationSequence[0]
        assert scheme.CodingSchemeDesignator == "99CXRAUD"
        assert scheme.CodingSchemeResponsibleOrganization
        device_name = _named(sr, "Device Observer Name")[0].TextValue
        assert "RESEARCH ONLY" in device_name
        model = _named(sr, "Device Observer Model Name")[0].TextValue
        assert model.startswith("local/tiny-medgemma 0123abc;")
        assert "prompt_hash=sha256:feedface" in model and "comparator=comparator-1" in model
        ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
        assert "RESEARCH USE ONLY" in ours[0].ContributionDescription
        assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        # identity comes from the evidence, never from us
        assert sr.PatientID == study.datasets[0].PatientID
        assert sr.StudyInstanceUID == study.study_uid

    def test_box_group_carries_finding_site_flags_certainty_and_provenance(
        self, tmp_path: Path
    ) -> None:
        study = make_study(tmp_path)
        sr = _reread(_sr(study, findings_result(study)))
        groups = sr.content.get_planar_roi_measurement_groups()
        ptx = next(g for g in groups if g.finding_type.value == "36118008")
        assert ptx.reference_type.value == "111030"
        assert ptx.roi.graphic_type.value == "POLYLINE"
        source = ptx.roi.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM IMAGE
        assert source.ReferencedSOPInstanceUID == study.datasets[0].SOPInstanceUID
        assert [s.value.value for s in ptx.finding_sites] == ["3120008"]
        assert sorted(_evaluations(ptx, codes.DRAFT_CONCORDANCE)) == ["AUD0101", "AUD0103"]
        assert _evaluations(ptx, codes.LEVEL_OF_SIGNIFICANCE) == ["371926006"]
        certainty = ptx.get_measurements(codes.CERTAINTY)[0]
        assert certainty.value == pytest.approx(80.0)
        assert certainty.unit.value == "%"
        assert ptx.tracking_identifier.startswith("AI finding: pneumothorax")
        assert ptx.tracking_uid.startswith("2.25.")
        assert [i.TextValue for i in _named(ptx[0], "Algorithm Name")] == ["local/tiny-medgemma"]
        assert [i.TextValue for i in _named(ptx[0], "Algorithm Version")] == ["0123abc"]
        params = [i.TextValue for i in _named(sr, "Algorithm Parameters")]
        assert "prompt_hash=sha256:feedface" in params
        assert "comparator=comparator-1" in params
        # the draft's own words for the effusion it asserted
        statements = [i.TextValue for i in _named(sr, codes.DRAFT_STATEMENT.meaning)]
        assert "Small left pleural effusion" in statements

    def test_unsupported_claim_is_image_level_absent_with_flag_and_span(
        self, tmp_path: Path
    ) -> None:
        study = make_study(tmp_path)
        sr = _reread(_sr(study, unsupported_result(study)))
        (group,) = sr.content.get_image_measurement_groups()
        assert group.finding_type.value == "60046008"
        assert group.tracking_identifier.startswith("Draft claim: pleural_effusion")
        assert _evaluations(group, codes.PRESENCE) == ["272519000"]
        assert _evaluations(group, codes.DRAFT_CONCORDANCE) == ["AUD0102"]
        assert group.source_images[0].referenced_sop_instance_uid == study.datasets[0].SOPInstanceUID
        assert [i.TextValue for i in _named(group[0], codes.DRAFT_STATEMENT.meaning)] == [
            "Small left pleural effusion"
        ]

    def test_no_finding_is_image_level_no_abnormality(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        sr = _reread(_sr(study, no_finding_result(study)))
        assert sr.content.get_planar_roi_measurement_groups() == []
        (group,) = sr.content.get_image_measurement_groups()
        assert (group.finding_type.value, group.finding_type.scheme_designator) == ("111286", "DCM")
        assert group.get_measurements(codes.CERTAINTY)[0].value == pytest.approx(97.0)

    def test_box_round_trips_within_one_pixel(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, rows=1000, cols=820)
        known = (123.4, 456.7, 345.6, 789.1)
        geometry = Geometry.letterbox(820, 1000, 896)
        model_box = geometry.from_source(PixelBox(x0=known[0], y0=known[1], x1=known[2], y1=known[3]))
        rounded = model_box.model_copy(update={k: round(v, 3) for k, v in model_box.model_dump().items()})
        pixel_box = geometry.to_source(rounded)
        assert pixel_box is not None
        f = finding(study, Label.CARDIOMEGALY, None).model_copy(
            update={"box": rounded, "pixel_box": pixel_box}
        )
        sr = _reread(_sr(study, result_for(study, [f], [])))
        points = sr.content.get_planar_roi_measurement_groups()[0].roi.value
        x0, y0, x1, y1 = known
        expected = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        assert points.shape == (5, 2)
        assert np.abs(points - expected).max() < 1.0

    def test_dx_without_orientation_or_spacing_still_validates(self, tmp_path: Path) -> None:
        study = make_study(tmp_path, patient_orientation=None, pixel_spacing=None)
        assert not library_entry_possible(study.datasets[0])
        result = result_for(
            study,
            [finding(study, Label.NODULE_MASS, (100.0, 100.0, 140.0, 130.0))],
            [Flag(kind=FlagKind.URGENT, label=Label.NODULE_MASS, rationale="r")],
        )
        path = tmp_path / "sr.dcm"
        path.write_bytes(encode_validated(_sr(study, result)))
        assert dciodvfy_errors(path) == []
        tree = dsrdump_tree(path)
        assert "Image Region" in tree
        sr = pydicom.dcmread(path)
        assert _named(sr, "Image Library Group") == []  # nothing invented for the library
        (group,) = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (
            "AUD0201",
            "99CXRAUD",
        )

    @pytest.mark.parametrize(
        ("box", "code"),
        [((100.0, 100.0, 200.0, 180.0), "27925004"), ((100.0, 100.0, 400.0, 300.0), "4147007")],
    )
    def test_nodule_or_mass_by_size_when_spacing_known(
        self, tmp_path: Path, box: tuple[float, float, float, float], code: str
    ) -> None:
        study = make_study(tmp_path, pixel_spacing=0.2)  # 100 px = 20 mm, 300 px = 60 mm
        result = result_for(study, [finding(study, Label.NODULE_MASS, box)], [])
        (group,) = _reread(_sr(study, result)).content.get_planar_roi_measurement_groups()
        assert group.finding_type.value == code

    def test_laterality_of_a_box_qualifies_its_finding_site(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        left = finding(study, Label.PLEURAL_EFFUSION, (300.0, 330.0, 460.0, 470.0), laterality="left")
        (group,) = _reread(_sr(study, result_for(study, [left], []))).content.get_planar_roi_measurement_groups()
        (site,) = group.finding_sites
        assert site.value.value == "3120008"
        assert site.laterality is not None and site.laterality.value == "7771000"

    def test_failed_image_analysis_is_partial_and_says_it_is_not_normal(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        failed = result_for(study, [], [], mode=AuditMode.NO_FLAGS).model_copy(
            update={"grounding": GroundingResult(state=GroundingState.FAILED, raw_text="garbage")}
        )
        sr = _reread(_sr(study, failed))
        assert sr.CompletionFlag == "PARTIAL"
        comments = [i.TextValue for i in _named(sr, "Comment")]
        assert comments[1].startswith("Image analysis failed")
        assert "not a normal study" in comments[1]
        (group,) = sr.content.get_image_measurement_groups()
        assert group.finding_type is None
        assert group.tracking_identifier.startswith("Image analysis failed")
        assert group.source_images[0].referenced_sop_instance_uid == study.datasets[0].SOPInstanceUID
        path = tmp_path / "sr.dcm"
        sr.save_as(path)
        assert dciodvfy_errors(path) == []

    def test_multi_frame_source_references_the_audited_frame(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        ds = study.datasets[0]
        ds.NumberOfFrames = 3
        result = findings_result(study)
        images = [result.inputs.images[0].model_copy(update={"frame": 1})]
        result = result.model_copy(update={"inputs": result.inputs.model_copy(update={"images": images})})
        assert referenced_frames(result, 0, ds) == [2]
        content = build_report_content(result, study.datasets, "2.25.9")
        (ref,) = [i for i in _items(content[0]) if i.ValueType == "IMAGE" and "ReferencedFrameNumber" in i.ReferencedSOPSequence[0]][:1]
        assert ref.ReferencedSOPSequence[0].ReferencedFrameNumber == 2

    def test_library_describes_images_with_full_headers(self, tmp_path: Path) -> None:
        study = make_study(tmp_path)
        sr = _reread(_sr(study, no_finding_result(study)))
        spacing = _named(sr, "Horizontal Pixel Spacing")
        assert float(spacing[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.143)


class TestPrivateCodes:
    def test_finding_code_nodule_mass_threshold_and_umbrella(self) -> None:
        assert codes.finding_code(Label.NODULE_MASS, 30.0).value == "27925004"
        assert codes.finding_code(Label.NODULE_MASS, 30.1).value == "4147007"
        assert codes.finding_code(Label.NODULE_MASS, None) == codes.NODULE_OR_MASS
        assert codes.finding_code(Label.PNEUMOTHORAX, 50.0).value == "36118008"

    def test_every_label_has_a_finding_site_and_code(self) -> None:
        for label in Label:
            assert codes.finding_code(label).meaning
            assert codes.FINDING_SITES[label].scheme_designator == "SCT"

    def test_flag_codes_are_private_scheme(self) -> None:
        assert {c.value for c in codes.FLAG_CODES.values()} == {"AUD0101", "AUD0102", "AUD0103"}
        assert all(c.scheme_designator == "99CXRAUD" for c in codes.FLAG_CODES.values())
        assert codes.coding_scheme_identification().CodingSchemeDesignator == "99CXRAUD"
