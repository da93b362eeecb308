"""SR, GSPS and SC sent to a real Orthanc land in the source's study, intact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_agent.config import AgentSettings, Destination
from dicom_agent.forward import forward_files
from tests.support.orthanc import ORTHANC, OrthancServer, start_orthanc
from tests.support.studies import written_findings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed"),
]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server = start_orthanc(tmp_path / "orthanc", ae_title="RESEARCHPACS")
    yield server
    server.stop()


def _items(node: Any) -> Iterator[Any]:
    """Every content item under ``node`` (Orthanc JSON or a pydicom Dataset), depth first."""
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _meaning(item: dict[str, Any]) -> str:
    return str(item["ConceptNameCodeSequence"][0]["CodeMeaning"])


def test_results_land_in_the_source_study(
    orthanc: OrthancServer, tmp_path: Path, settings: AgentSettings
) -> None:
    study, result, files = written_findings(tmp_path, settings)
    dest = Destination(
        name="orthanc", ae_title="RESEARCHPACS", host="127.0.0.1", port=orthanc.dicom_port, research=True
    )
    forward_files(dest, [study.sources[0], *files], calling_ae="CXRAUDIT")

    instances = orthanc.study_instances(study.study_uid)
    by_uid = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances}
    assert set(by_uid) == {str(study.datasets[0].SOPInstanceUID), *result.outputs.values()}
    assert len({i["ParentSeries"] for i in instances}) == 4  # source + our three series

    sr_tags = orthanc.tags(by_uid[result.outputs["sr"]])
    assert sr_tags["VerificationFlag"] == "UNVERIFIED"
    assert "RESEARCH USE ONLY" in sr_tags["SeriesDescription"]
    ours = pydicom.dcmread(study.study_dir / "v1" / "sr.dcm")
    stored_items = list(_items(sr_tags))
    assert len(stored_items) == len(list(_items(ours))) > 40
    groups = [i for i in stored_items if _meaning(i) == "Measurement Group"]
    assert len(groups) == 3  # effusion box, pneumothorax box, unlocalised nodule
    scoords = [i for i in stored_items if i.get("ValueType") == "SCOORD"]
    assert len(scoords) == 2
    for scoord in scoords:
        assert scoord["GraphicType"] == "POLYLINE"
        assert len(scoord["GraphicData"].split("\\")) == 10  # 5 closed (column, row) points
        ref = scoord["ContentSequence"][0]
        assert ref["RelationshipType"] == "SELECTED FROM"
        assert ref["ReferencedSOPSequence"][0]["ReferencedSOPInstanceUID"] == str(
            study.datasets[0].SOPInstanceUID
        )

    sc_tags = orthanc.tags(by_uid[result.outputs["sc:0"]])
    assert sc_tags["BurnedInAnnotation"] == "YES"
    gsps_tags = orthanc.tags(by_uid[result.outputs["gsps:0"]])
    assert gsps_tags["ContentLabel"] == "AI_AUDIT_RSRCH"
    referenced = gsps_tags["ReferencedSeriesSequence"][0]["ReferencedImageSequence"][0]
    assert referenced["ReferencedSOPInstanceUID"] == str(study.datasets[0].SOPInstanceUID)
