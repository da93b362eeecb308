"""Tests of report-style grounding output (explain-my-xray): text + <loc> boxes → findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_auditor.errors import ParseError
from cxr_auditor.geometry import Geometry
from cxr_auditor.grounding import build_grounder
from cxr_auditor.grounding.base import ImageInput
from cxr_auditor.grounding.report import ReportParser
from cxr_auditor.labels import Label
from cxr_auditor.profiles import parse_profile
from cxr_auditor.schema import GroundingState, Laterality
from tests.support import tinymodels as tm
from tests.support.model_fixtures import GREY, tiny_profile

TWO_BOXES = (
    "FINDINGS: Left pleural effusion <loc0600><loc0600><loc0900><loc0900>. Small nodule in the "
    "right upper lobe <loc0100><loc0200><loc0300><loc0400>. No pneumothorax.\n"
    "IMPRESSION: Effusion and nodule."
)


def _box(result_box: object) -> list[float]:
    assert result_box is not None
    return [round(v * 1024) for v in result_box.as_list()]  # type: ignore[attr-defined]


class TestReportParser:
    def test_each_box_goes_to_the_label_of_its_sentence(self) -> None:
        result = ReportParser().parse(TWO_BOXES, image_index=2)
        assert result.state is GroundingState.OK
        by_label = {f.label: f for f in result.findings}
        assert set(by_label) == {Label.PLEURAL_EFFUSION, Label.NODULE_MASS}
        assert _box(by_label[Label.PLEURAL_EFFUSION].box) == [600, 600, 900, 900]
        assert _box(by_label[Label.NODULE_MASS].box) == [100, 200, 300, 400]
        assert all(f.image_index == 2 for f in result.findings)

    def test_report_text_is_kept_without_box_tokens(self) -> None:
        result = ReportParser().parse(TWO_BOXES)
        assert result.report_text is not None
        assert "<loc" not in result.report_text
        assert result.report_text.startswith("FINDINGS: Left pleural effusion. Small nodule")

    def test_denied_label_gets_no_finding_and_its_box_is_unattached(self) -> None:
        text = "FINDINGS: No pneumothorax <loc0010><loc0010><loc0200><loc0200>. Cardiomegaly."
        result = ReportParser().parse(text)
        assert [f.label for f in result.findings] == [Label.CARDIOMEGALY]
        assert result.findings[0].box is None and "box_unattached" in result.notes

    def test_box_in_a_locations_line_attaches_to_the_label_named_there(self) -> None:
        text = (
            "FINDINGS: Right pneumothorax.\n"
            "LOCATIONS: pneumothorax <loc0102><loc0614><loc0512><loc0921>\nIMPRESSION: Pneumothorax."
        )
        (finding,) = ReportParser().parse(text).findings
        assert finding.label is Label.PNEUMOTHORAX and _box(finding.box) == [102, 614, 512, 921]

    def test_side_in_words_stays_on_a_finding_without_box(self) -> None:
        (finding,) = ReportParser().parse("FINDINGS: Left pleural effusion.").findings
        assert finding.box is None and finding.laterality is Laterality.LEFT

    def test_normal_report_is_no_finding(self) -> None:
        text = "FINDINGS: Lungs are clear. No pleural effusion or pneumothorax.\nIMPRESSION: Normal chest."
        result = ReportParser().parse(text)
        assert [f.label for f in result.findings] == [Label.NO_FINDING]

    def test_out_of_label_space_is_inconclusive_not_normal(self) -> None:
        result = ReportParser().parse("FINDINGS: Atelectasis at the bases.")
        assert result.state is GroundingState.INCONCLUSIVE and result.report_text

    def test_incomplete_box_tokens_are_noted(self) -> None:
        result = ReportParser().parse("FINDINGS: Cardiomegaly <loc0100><loc0100><loc0300>.")
        assert "loc_tokens_dropped:incomplete_or_invalid" in result.notes
        assert result.findings[0].label is Label.CARDIOMEGALY and result.findings[0].box is None

    def test_extra_terms_from_profile_labels(self) -> None:
        result = ReportParser({"air leak": "pneumothorax"}).parse("FINDINGS: Air leak at the apex.")
        assert [f.label for f in result.findings] == [Label.PNEUMOTHORAX]

    def test_empty_answer_raises_parse_error(self) -> None:
        with pytest.raises(ParseError):
            ReportParser().parse("  <loc0001>  ")


@pytest.mark.slow
def test_explain_my_xray_profile_end_to_end(trained_gemma: Path) -> None:
    """The trained tiny model writes the report for a grey image; the box token survives
    decoding and lands on the pneumothorax."""
    profile = parse_profile(tiny_profile("explain-my-xray", trained_gemma, adapter=None, projector=None))
    grounder = build_grounder(profile)
    image = ImageInput(tm.solid_image(GREY), 0, Geometry.identity(64, 64))
    (result,) = grounder.ground([image])
    assert result.state is GroundingState.OK, result
    (finding,) = result.findings
    assert finding.label is Label.PNEUMOTHORAX and _box(finding.box) == [102, 614, 512, 921]
    assert result.report_text is not None and "IMPRESSION: Pneumothorax." in result.report_text
