"""A real PACS end to end: Orthanc sends studies to the agent, the results come back to it.

Orthanc (``tests/support/orthanc.py``: loopback, its own config and storage) declares the agent as
the DICOM modality ``agent``; the agent declares Orthanc as its research destination. Synthetic
radiographs go into Orthanc over REST (``POST /instances``), Orthanc is asked to send each
study to the agent (``POST /modalities/agent/store``), drafts are dropped into the agent's
folder, and the SR, GSPS and SC must arrive back in the *same* study in Orthanc, which we read
through its REST API: research-only marking, flags, and the SCOORD referencing the source.

The fake grounder answers by image brightness (``cxr_auditor.grounding.fake``): a MONOCHROME1
phantom is bright (pneumothorax on the image right, effusion on the image left), one windowed
far above its values is dark (no finding). The drafts are written against that, so the flags
are known.

Also: dcmtk ``echoscu`` and ``storescu`` straight against the agent.
"""

from __future__ import annotations

import io
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.support.agentproc import AGENT_AET, AgentProcess, make_study, storescu, wait_until
from tests.support.builders import save
from tests.support.orthanc import Modality, OrthancServer, start_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _codes(items: Any) -> list[tuple[str, str]]:
    """Every (concept name, coded value) pair of an SR content tree, depth first."""
    out: list[tuple[str, str]] = []
    for item in items or []:
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if "ConceptCodeSequence" in item:
            out.append((name, item.ConceptCodeSequence[0].CodeValue))
        out += _codes(item.get("ContentSequence"))
    return out


def _scoord_references(items: Any) -> list[str]:
    """SOP Instance UIDs referenced by the IMAGE items under each SCOORD."""
    out: list[str] = []
    for item in items or []:
        if item.ValueType == "SCOORD":
            for child in item.ContentSequence:
                out += [r.ReferencedSOPInstanceUID for r in child.ReferencedSOPSequence]
        out += _scoord_references(item.get("ContentSequence"))
    return out


@pytest.fixture
def pacs_and_agent(tmp_path: Path) -> Any:
    agent = AgentProcess(tmp_path / "agent", {
        "scp": {"allowed_calling_aets": ["ORTHANC", "TESTSCU"]},
        "forward": {
            "enabled": True,
            "calling_ae_title": AGENT_AET,
            "retry_backoff_seconds": 0.5,
            "retry_backoff_max_seconds": 2,
        },
    })
    orthanc = start_orthanc(
        tmp_path / "orthanc",
        modalities={"agent": Modality(AGENT_AET, "127.0.0.1", agent.port)},
    )
    agent.config["forward"]["destinations"] = [{
        "name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
        "port": orthanc.dicom_port, "research": True,
    }]
    agent.write_config()
    try:
        agent.start()
        yield orthanc, agent
    finally:
        agent.stop()
        orthanc.stop()


def _results_in_pacs(
    orthanc: OrthancServer, agent: AgentProcess, study_uid: str
) -> dict[str, list[str]] | None:
    """Orthanc ids of our objects by SOP class, once every object the agent's latest result
    lists (``outputs``: kind -> SOP Instance UID) is in the study in Orthanc."""
    audit = agent.result(study_uid)
    if audit is None or not audit["outputs"]:
        return None
    found: dict[str, list[str]] = {}
    uids = set()
    for inst in orthanc.study_instances(study_uid):
        meta = orthanc.get(f"/instances/{inst['ID']}/metadata", expand="")
        found.setdefault(meta["SopClassUid"], []).append(inst["ID"])
        uids.add(inst["MainDicomTags"]["SOPInstanceUID"])
    return found if set(audit["outputs"].values()) <= uids else None


def test_orthanc_sends_studies_and_receives_sr_gsps_sc_in_the_same_study(
    pacs_and_agent: tuple[OrthancServer, AgentProcess],
) -> None:
    orthanc, agent = pacs_and_agent
    bright = make_study(2, accession="PACS01", size=256, photometric="MONOCHROME1")
    # A window centred above every stored value renders the phantom black: "no finding".
    dark = make_study(1, accession="PACS02", size=256, window=(4000.0, 100.0))
    for ds in [*bright, *dark]:
        orthanc.post("/instances", _part10(ds))
    agent.drop_draft("PACS01.txt", "FINDINGS: No pneumothorax. Small right pleural effusion.\n")
    agent.drop_draft("PACS02.txt", "FINDINGS: Large left pneumothorax.\n")
    for study in (bright, dark):
        (hit,) = [h for h in orthanc.lookup(study[0].StudyInstanceUID) if h["Type"] == "Study"]
        answer = orthanc.post("/modalities/agent/store",
                              {"Resources": [hit["ID"]], "Synchronous": True})
        assert answer["FailedInstancesCount"] == 0, answer

    results = {}
    for study in (bright, dark):
        uid = study[0].StudyInstanceUID
        results[uid] = wait_until(partial(_results_in_pacs, orthanc, agent, uid), timeout=120,
                                  what="SR, GSPS and SC in Orthanc", interval=0.5,
                                  alive=agent.check_alive)

    # The bright study: pneumothorax missed (and urgent), effusion supported.
    uid = bright[0].StudyInstanceUID
    audit = agent.result(uid)
    assert audit is not None
    kinds = {(f["kind"], f["label"]) for f in audit["flags"]}
    assert ("missing", "pneumothorax") in kinds and ("urgent", "pneumothorax") in kinds, kinds
    (sr_id,) = results[uid][SR_CLASS]
    sr = dcmread(io.BytesIO(orthanc.client.get(f"/instances/{sr_id}/file").content))
    assert sr.StudyInstanceUID == uid
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
    assert "RESEARCH" in sr.SeriesDescription.upper()
    codes = _codes(sr.ContentSequence)
    assert ("AUD0001", "AUD0101") in codes  # MISSING (99CXRAUD scheme)
    assert ("AUD0001", "AUD0103") in codes  # URGENT
    sources = {ds.SOPInstanceUID for ds in bright}
    refs = _scoord_references(sr.ContentSequence)
    assert refs and set(refs) <= sources
    assert len(results[uid][GSPS_CLASS]) == len(results[uid][SC_CLASS]) == 2
    tags = orthanc.tags(results[uid][SC_CLASS][0])
    assert tags["BurnedInAnnotation"] == "YES"

    # The dark study: the draft's pneumothorax is unsupported by the image.
    uid = dark[0].StudyInstanceUID
    audit = agent.result(uid)
    assert audit is not None
    assert ("unsupported", "pneumothorax") in {(f["kind"], f["label"]) for f in audit["flags"]}
    (sr_id,) = results[uid][SR_CLASS]
    codes = _codes(dcmread(io.BytesIO(orthanc.client.get(f"/instances/{sr_id}/file").content))
                   .ContentSequence)
    assert ("AUD0001", "AUD0102") in codes
    # Nothing sent twice: one SR per study in the PACS.
    assert all(len(r[SR_CLASS]) == 1 for r in results.values())


def test_dcmtk_echoscu_and_storescu_against_the_agent(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent")
    agent.start()
    try:
        echo = subprocess.run(
            ["echoscu", "-aet", "TESTSCU", "-aec", AGENT_AET, "127.0.0.1", str(agent.port)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert echo.returncode == 0, echo.stderr
        wrong = subprocess.run(
            ["echoscu", "-aet", "TESTSCU", "-aec", "NOTAGENT", "127.0.0.1", str(agent.port)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert wrong.returncode != 0
        study = make_study(2, accession="DCMTK01", size=128)
        files = [save(ds, tmp_path / "in" / f"{k}.dcm") for k, ds in enumerate(study)]
        sent = storescu(agent.port, files)
        assert sent.returncode == 0, sent.stderr
        agent.drop_draft("DCMTK01.txt", "No acute cardiopulmonary process.\n")
        audit = wait_until(lambda: agent.result(study[0].StudyInstanceUID), timeout=60,
                           what="the audit", alive=agent.check_alive)
    finally:
        agent.stop()
    assert sorted(i["sop_instance_uid"] for i in audit["inputs"]["images"]) == sorted(
        ds.SOPInstanceUID for ds in study
    )
    assert audit["draft"]["state"] == "parsed"
