"""``cxr-agent serve`` end to end: dcmtk storescu in, drafts dropped in the folder, audit.json out.

One agent (fake grounding profile, 1 s settle, short draft and study waits) handles every
pairing case at once, each on its own study:

- A: draft dropped before the images (by accession number), then a late instance: version 2;
- B: draft dropped right after the images (JSON, by Study Instance UID);
- C: no draft: image-only audit (version 1), then a late draft: version 2;
- D: bad drafts (empty, bad name, bad JSON) end in ``rejected/`` with a reason;
- E: draft with no study becomes an orphan, then pairs when the study arrives.

A second agent is SIGKILLed while audits are queued or running and restarted: every
acknowledged instance is audited, each study exactly once per version. A third runs a real
transformers grounder: the tiny Gemma 3 trained in a fixture (tests/support/model_fixtures.py), so the
flags come from what a model generated, parsed and compared.

The fake grounder answers by brightness: the default phantom gets a pneumothorax (box on the
image right) and a pleural effusion (image left); the dark-windowed one gets no_finding.
Waiting is by polling files and the state DB, never fixed sleeps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from tests.support.agentproc import AgentProcess, storescu, wait_until
from tests.support.builders import SENTINEL_PATIENT_ID, SENTINEL_PATIENT_NAME, make_cxr, save
from tests.support.model_fixtures import tiny_profile, tiny_root, trained_gemma  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT = 30.0
DARK = (3000.0, 1000.0)
OVERRIDES = {
    "pairing": {"settle_seconds": 1, "draft_wait_seconds": 3, "study_wait_seconds": 2,
                "poll_seconds": 0.2},
    "logging": {"json_lines": True},
}
DRAFT_A = "Small right pleural effusion. No pneumothorax."
DRAFT_C = "Right pleural effusion. Left pneumothorax."


def study_files(root: Path, study_uid: str, accession: str, **kw: Any) -> list[Path]:
    """A frontal and a lateral view of one study, saved as Part 10 files."""
    series = generate_uid()
    files = []
    for n, view in enumerate(("PA", "LL")):
        ds = make_cxr(rows=128, cols=112, study_uid=study_uid, series_uid=series,
                      accession=accession, view_position=view, seed=n, **kw)
        ds.InstanceNumber = n + 1
        files.append(save(ds, root / "send" / study_uid / f"{n}.dcm"))
    return files


def send(agent: AgentProcess, files: list[Path]) -> None:
    done = storescu(agent.port, files)
    assert done.returncode == 0, done.stderr


def drop(agent: AgentProcess, name: str, data: bytes) -> bytes:
    """Write a draft the way a careful writer does: a temp name, then a rename."""
    folder = agent.path("drafts")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(folder / name)
    return data


def result(agent: AgentProcess, study_uid: str, version: int | None = None) -> dict[str, Any] | None:
    """``audit.json`` of a study (or of one version), once it exists."""
    folder = agent.path("out") / study_uid
    path = folder / "audit.json" if version is None else folder / f"v{version}" / "audit.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_result(agent: AgentProcess, study_uid: str, *, version: int = 1) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = result(agent, study_uid)
        return body if body and body["result_version"] >= version else None

    return wait_until(ready, timeout=TIMEOUT, what=f"audit v{version}", alive=agent.check_alive)


def flags(body: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["kind"], f["label"]) for f in body["flags"]}


@pytest.fixture
def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = AgentProcess(tmp_path / "agent", OVERRIDES)
    try:
        yield proc
    finally:
        proc.kill()


def test_pairing_cases_end_to_end(agent: AgentProcess, tmp_path: Path) -> None:
    uid = {k: generate_uid() for k in "ABCE"}
    agent.start()

    # A and E drafts first (E's study comes much later), plus three bad drafts.
    sha_a = hashlib.sha256(drop(agent, "ACC-A.txt", DRAFT_A.encode())).hexdigest()
    drop(agent, "ACC-E.txt", b"No acute cardiopulmonary abnormality.")
    drop(agent, "ACC-D.txt", b"")
    drop(agent, "bad name!.txt", b"Normal chest.")
    drop(agent, "d.json", b'{"accession_number": "ACC-D", "text": ')
    rejected = agent.path("drafts") / "rejected"
    wait_until(lambda: len(list(rejected.glob("*.reason.txt"))) == 3, timeout=TIMEOUT,
               what="3 rejected drafts", alive=agent.check_alive)
    reasons = sorted(p.read_text().splitlines()[0] for p in rejected.glob("*.reason.txt"))
    assert reasons == ["reason: bad_json", "reason: bad_name", "reason: empty"]

    send(agent, study_files(tmp_path, uid["A"], "ACC-A")
         + study_files(tmp_path, uid["B"], "ACC-B")
         + study_files(tmp_path, uid["C"], "ACC-C"))
    drop(agent, "b.json", json.dumps(
        {"study_instance_uid": uid["B"], "text": "Normal heart size. No effusion.",
         "author": "resident"}).encode())

    # A: draft before the images; the lateral view is skipped and said so.
    a = wait_result(agent, uid["A"])
    assert a["mode"] == "full" and a["result_version"] == 1
    assert a["draft"]["state"] == "parsed" and a["inputs"]["draft_sha256"] == sha_a
    assert [s["reason"] for s in a["inputs"]["skipped_images"]] == ["lateral_view"]
    assert len(a["inputs"]["images"]) == 1
    assert ("urgent", "pneumothorax") in flags(a) and ("missing", "pneumothorax") in flags(a)
    missing = next(f for f in a["flags"] if f["kind"] == "missing")
    assert missing["denied"] is True

    # A again: a late instance re-opens the audited study; it settles and gives version 2.
    late = make_cxr(rows=128, cols=112, study_uid=uid["A"], accession="ACC-A", seed=7)
    send(agent, [save(late, tmp_path / "send" / "late.dcm")])
    a2 = wait_result(agent, uid["A"], version=2)
    assert sorted(i["image_id"] for i in a2["inputs"]["images"]) == sorted(
        [a["inputs"]["images"][0]["image_id"], late.SOPInstanceUID])
    assert a2["mode"] == "full" and a2["inputs"]["draft_sha256"] == sha_a
    assert result(agent, uid["A"], 1) == a  # version 1 untouched

    # B: draft after the images, before the draft wait ran out: one full audit.
    b = wait_result(agent, uid["B"])
    assert b["mode"] == "full" and b["result_version"] == 1
    assert ("missing", "pleural_effusion") in flags(b)

    # C: no draft: image-only v1, then the late draft gives v2; v1 is kept as it was.
    c1 = wait_result(agent, uid["C"])
    assert c1["mode"] == "image_only" and c1["draft"]["state"] == "none"
    assert ("urgent", "pneumothorax") in flags(c1)
    drop(agent, "ACC-C.txt", DRAFT_C.encode())
    c2 = wait_result(agent, uid["C"], version=2)
    assert c2["mode"] == "full" and c2["inputs"]["draft_file"] == "ACC-C.txt"
    assert not {k for k, _ in flags(c2)} & {"missing", "unsupported"}
    assert result(agent, uid["C"], 1)["mode"] == "image_only"  # type: ignore[index]

    # E: orphan (status says so), kept, and paired when the study finally arrives.
    status = wait_until(lambda: (s := agent.status())["orphan_drafts"] == 1 and s,
                        timeout=TIMEOUT, what="orphan draft", alive=agent.check_alive)
    assert status["agent"]["running"] is True
    assert "orphan drafts: 1" in agent.cli("status").stdout
    send(agent, study_files(tmp_path, uid["E"], "ACC-E", window=DARK))
    e = wait_result(agent, uid["E"])
    assert e["mode"] == "full" and e["grounding"]["findings"][0]["label"] == "no_finding"
    assert e["flags"] == []
    assert agent.status()["orphan_drafts"] == 0

    # No bad draft reached the DB; no patient data in the log; health says serving.
    assert agent.db_query("SELECT COUNT(*) AS n FROM drafts")[0]["n"] == 4
    log = agent.log_text()
    for secret in (SENTINEL_PATIENT_NAME, SENTINEL_PATIENT_ID, "ACC-A", DRAFT_A, uid["A"]):
        assert secret not in log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    events = [r.get("event") for r in records]
    assert {"draft.accepted", "draft.rejected", "draft.orphan", "study.settled", "study.reopened",
            "audit.done"} <= set(events)
    # One study, one reference: every line about a draft names the study its draft.paired names.
    paired = {r["draft_id"]: r["study"] for r in records if r.get("event") == "draft.paired"}
    assert len(paired) >= 4
    for r in records:
        if r.get("draft_id") in paired and "study" in r:
            assert r["study"] == paired[r["draft_id"]], r
    metrics = agent.metrics()
    assert 'cxr_agent_job_events_total{event="done"} 6.0' in metrics  # A1, A2, B, C1, C2, E
    assert 'cxr_agent_drafts_total{outcome="rejected_bad_json"} 1.0' in metrics
    assert SENTINEL_PATIENT_NAME not in metrics and "ACC-" not in metrics
    health = agent.healthz()
    assert health is not None and health["serving"] and health["model"]["state"] == "ready"
    assert agent.stop() == 0
    assert agent.status()["agent"]["running"] is False


def test_sigkill_with_jobs_in_flight_loses_nothing(agent: AgentProcess, tmp_path: Path) -> None:
    agent.config["worker"]["batch_size"] = 1  # one study per model call: jobs stay queued longer
    agent.write_config()
    agent.start()
    studies = [generate_uid() for _ in range(8)]
    sent: dict[str, list[str]] = {}
    files: list[Path] = []
    for n, study in enumerate(studies):
        drop(agent, f"ACC-K{n}.txt", b"Left pneumothorax. Right pleural effusion.")
        batch = study_files(tmp_path, study, f"ACC-K{n}")
        files += batch
        sent[study] = [str(pydicom.dcmread(f).SOPInstanceUID) for f in batch]
    send(agent, files)
    # Kill as soon as the first audit is on disk: the others are queued or running.
    wait_until(lambda: any(result(agent, s) for s in studies), timeout=TIMEOUT,
               what="first audit", alive=agent.check_alive)
    agent.kill()
    unfinished = agent.db_query("SELECT COUNT(*) AS n FROM jobs WHERE state != 'done'")[0]["n"]

    agent.start()
    for study in studies:
        body = wait_result(agent, study)
        assert body["result_version"] == 1 and body["mode"] == "full"
        audited = {i["image_id"] for i in body["inputs"]["images"]}
        skipped = {s["image_id"] for s in body["inputs"]["skipped_images"]}
        assert audited | skipped == set(sent[study])  # every acknowledged instance accounted for
        assert sorted(p.name for p in (agent.path("out") / study).glob("v*")) == ["v1"]
    # audit.json is written just before its job is marked done: wait for the DB too.
    query = "SELECT study_instance_uid, state, result_version FROM jobs WHERE kind='audit'"
    jobs = wait_until(lambda: (rows := agent.db_query(query)) and all(
        r["state"] == "done" for r in rows) and rows, timeout=TIMEOUT, what="jobs done",
        alive=agent.check_alive)
    assert sorted(j["study_instance_uid"] for j in jobs) == sorted(studies)  # once per version
    assert {(j["state"], j["result_version"]) for j in jobs} == {("done", 1)}
    assert unfinished >= 1  # the kill did interrupt work
    assert "state.reconciled" in agent.log_text()


def test_model_unavailable_keeps_receiving_and_drains_once_it_loads(tmp_path: Path) -> None:
    """The shipped default profile has no weights here: serve still receives, pairs and queues,
    says ``waiting_model`` everywhere, and drains once a loadable model appears."""
    site = tmp_path / "profiles"
    site.mkdir()
    proc = AgentProcess(
        tmp_path / "agent",
        {**OVERRIDES, "grounding": {"profile": "cxr-auditor-v2", "input_size": 64},
         "paths": {"profiles": str(site)}, "worker": {"model_retry_seconds": 1}},
        env={"HF_HUB_OFFLINE": "1"},
    )
    try:
        proc.start()
        study = generate_uid()
        drop(proc, "ACC-M.txt", b"Left pneumothorax.")
        send(proc, study_files(tmp_path, study, "ACC-M"))
        status = wait_until(
            lambda: (s := proc.status())["jobs"]["waiting_model"] == 1
            and s["model"]["state"] == "unavailable" and s,
            timeout=60, what="job waiting for the model", alive=proc.check_alive)
        assert "ModelUnavailable" in status["model"]["reason"]
        health = proc.healthz()
        assert health is not None and health["serving"] is True  # 200 while the model is away
        assert "audits wait" in health["message"]
        text = proc.cli("status").stdout
        assert "model: cxr-auditor-v2 unavailable: ModelUnavailable" in text
        assert status["model"]["reason"].split()[-1] in text  # the whole reason, to its last word
        (row,) = [ln for ln in text.splitlines() if ln.startswith("  ACC-M ")]
        assert "queued" in row and "the model: profile cxr-auditor-v2 is unavailable" in row
        assert "model.unavailable" in proc.log_text()
        assert result(proc, study) is None

        # A site profile of the same name that loads: the next retry picks it up.
        (site / "local.yaml").write_text(
            "name: cxr-auditor-v2\ntask: grounding\nbackend: fake\n", encoding="utf-8")
        body = wait_result(proc, study)
        assert body["mode"] == "full" and ("missing", "pleural_effusion") in flags(body)
        # status reads the heartbeat, written every couple of seconds: wait for the next one
        wait_until(lambda: proc.status()["model"]["state"] == "ready", timeout=30,
                   what="model ready in status", alive=proc.check_alive)
    finally:
        proc.kill()


def solid_study(root: Path, study_uid: str, accession: str, stored: int) -> list[Path]:
    """One square PA image of a single stored value: under its 0-4095 window, 4095 renders
    white and 0 black, the two images the trained tiny model has learned to answer."""
    ds = make_cxr(rows=64, cols=64, study_uid=study_uid, accession=accession, window=(2048, 4096))
    ds.PixelData = bytes([stored & 0xFF, stored >> 8]) * (64 * 64)
    return [save(ds, root / "send" / study_uid / "0.dcm")]


def test_serve_with_a_trained_tiny_transformers_grounder(
    tmp_path: Path, trained_gemma: Path  # noqa: F811 - fixture
) -> None:
    site = tmp_path / "profiles"
    site.mkdir()
    profile = tiny_profile("cxr-auditor-v2", trained_gemma, name="tiny-v2", prompt="explain_my_xray")
    (site / "tiny-v2.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
    proc = AgentProcess(
        tmp_path / "agent",
        {**OVERRIDES, "grounding": {"profile": "tiny-v2", "input_size": 64},
         "paths": {"profiles": str(site)}},
        env={"HF_HUB_OFFLINE": "1"},
    )
    white, black = generate_uid(), generate_uid()
    try:
        proc.start()
        drop(proc, "ACC-W.txt", b"No pneumothorax.")
        drop(proc, "ACC-K.txt", b"Small left pleural effusion.")
        send(proc, solid_study(tmp_path, white, "ACC-W", 4095))
        send(proc, solid_study(tmp_path, black, "ACC-K", 0))
        # first audit loads torch and the model in the worker: allow for it
        bodies = {
            uid: wait_until(lambda u=uid: result(proc, u), timeout=180, what="audit with the model",
                            alive=proc.check_alive)
            for uid in (white, black)
        }
    finally:
        proc.kill()

    lit, dark = bodies[white], bodies[black]
    assert lit["models"][0]["model_id"] == str(trained_gemma)
    # white: the model answers a pneumothorax box on the image right, which the draft denies
    (finding,) = lit["grounding"]["findings"]
    assert finding["label"] == "pneumothorax"
    assert finding["box"] == pytest.approx({"y0": 0.1, "x0": 0.6, "y1": 0.5, "x1": 0.9})
    kinds = {(f["kind"], f["label"], f.get("denied"), f.get("missed")) for f in lit["flags"]}
    assert ("missing", "pneumothorax", True, None) in kinds
    assert ("urgent", "pneumothorax", None, True) in kinds
    # black: the model answers no_finding, so the draft's effusion is unsupported
    assert [f["label"] for f in dark["grounding"]["findings"]] == ["no_finding"]
    assert flags(dark) == {("unsupported", "pleural_effusion")}
