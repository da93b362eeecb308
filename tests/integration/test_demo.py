"""``cxr-agent demo`` end to end: a real agent, a real C-STORE association, every output opened.

The demo must show every kind of flag, and its stand-in grounder must never pass for a model:
"stand-in, not a model" in the JSON, the overlay (its legend), the GSPS and the SR.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
from PIL import Image

from cxr_auditor.grounding.fake import STAND_IN
from cxr_auditor.render import legend_lines
from cxr_auditor.schema import AuditResult
from tests.support.agentproc import CXR_AGENT

pytestmark = pytest.mark.integration


def texts(ds: pydicom.Dataset) -> list[str]:
    """Every string value anywhere in a data set (sequences included)."""
    out: list[str] = []
    for elem in ds.iterall():
        if isinstance(elem.value, str):
            out.append(elem.value)
    return out


def test_demo_shows_every_flag_kind_and_labels_the_stand_in_everywhere(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    proc = subprocess.Popen([CXR_AGENT, "demo", "--serve", "--folder", str(folder)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        for line in proc.stdout:  # until the demo serves its results browser (--serve)
            printed.append(line)
            if line.startswith("browse the results: "):
                page = httpx.get(line.split()[3], timeout=10.0)
                assert page.status_code == 200 and "DEMO-001" in page.text
                # A second demo in the same folder must not clear it under the running one.
                second = subprocess.run([CXR_AGENT, "demo", "--folder", str(folder)], capture_output=True,
                                        text=True, timeout=120, check=False, cwd=tmp_path)
                assert second.returncode == 2 and "another cxr-agent (pid" in second.stderr
                assert (folder / "results" / "DEMO-001" / "audit.json").exists()
                break
        else:
            pytest.fail("".join(printed))
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its agent and exits cleanly
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(printed) + rest
    done = subprocess.CompletedProcess(proc.args, 0, "".join(printed) + rest, "")
    assert "stopping the demo agent" in done.stdout
    assert not list((folder / "state").glob("agent-status.json")) or json.loads(
        (folder / "state" / "agent-status.json").read_text())["stopped"] is True
    results = folder / "results"
    kinds: dict[str, set[str]] = {}
    for case in ("DEMO-001", "DEMO-002", "DEMO-003", "DEMO-004"):
        study = results / case
        assert f"{case}: {study}/" in done.stdout
        body = json.loads((study / "audit.json").read_text(encoding="utf-8"))
        kinds[case] = {f["kind"] for f in body["flags"]}
        assert [m["model_id"] for m in body["models"] if m["task"] == "grounding"] == [STAND_IN]
        result = AuditResult.model_validate(body)
        assert legend_lines(result, 0)[0].startswith("STAND-IN, NOT A MODEL")
        with Image.open(study / "overlay-0.png") as picture:
            assert picture.size == (512, 512)
        sr = pydicom.dcmread(study / "sr.dcm")
        assert STAND_IN in texts(sr)  # the algorithm name of every finding
        gsps = pydicom.dcmread(study / "gsps-0.dcm")
        assert any(t.startswith("STAND-IN, NOT A MODEL") for t in texts(gsps))
        sc = pydicom.dcmread(study / "sc-0.dcm")
        assert "RESEARCH USE ONLY" in sc.SeriesDescription
        assert len(list(study.iterdir())) == 5  # nothing failed validation
    assert {"laterality", "missing", "urgent"} <= kinds["DEMO-001"]
    assert kinds["DEMO-002"] == {"unsupported"}
    assert kinds["DEMO-004"] == {"urgent"}
    lateral = pydicom.dcmread(next((folder / "images" / "DEMO-001").glob("2-LL.dcm")))
    assert lateral.ViewPosition == "LL"  # sent, and (per the JSON) not audited
    body = json.loads((results / "DEMO-001" / "audit.json").read_text(encoding="utf-8"))
    assert len(body["inputs"]["images"]) == 1

    status = subprocess.run([CXR_AGENT, "status", "--json", "--config", str(folder / "agent.yaml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(status.stdout)["studies"]["audited"] == 4
