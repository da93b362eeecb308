"""Bad input against the running agent: the listener never dies, memory stays bounded.

DICOM: every file of pydicom's test-file collection that exists locally, then the mutation
corpus of :mod:`tests.support.mutations` (truncations, wrong lengths and VRs, missing or absurd pixel
attributes, false transfer-syntax claims, non-CXR modalities, non-UID and path-shaped UIDs),
sent byte-exact over C-STORE. Each file is either stored (and, outside the audit set,
ignored) or refused with a specific status and a log line; a C-ECHO after every batch proves
the listener is alive, and the agent's RSS is sampled from /proc before and after.

Drafts: empty, binary, too large, not UTF-8, deeply nested JSON, hostile names, JSON keys
shaped like paths, duplicate names and a draft rewritten while the agent watches it: each ends
in ``processed/`` or ``rejected/`` (with a reason file), and a good draft behind them is still
read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_files
from pynetdicom.dsutils import split_dataset

from tests.support.agentproc import AgentProcess, echo, running_agent, wait_until
from tests.support.mutations import CONTEXT_REJECTED, NO_RESPONSE, corpus, send_raw, valid_reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# C-STORE statuses a refusal may carry (PS3.4 B.2.3; our table in dicom_agent.conformance).
# 0xC211 is deliberately absent: it means the handler hit an unexpected exception (a bug).
STORED = 0x0000
REFUSALS = {0xA700, 0xA701, 0xA900, 0xC210}
BATCH = 25
# Growth of the agent's RSS allowed over the whole corpus after the first batch warmed it up:
# caches and allocator arenas settle, a leak of the received bytes (~5 MB per batch) would not.
RSS_GROWTH_KIB = 64 * 1024


def _sendable(paths: list[str]) -> dict[Path, str]:
    """pydicom test files that carry the file meta a byte-exact C-STORE needs, with the SOP
    Instance UID each claims."""
    out: dict[Path, str] = {}
    stems: set[str] = set()
    for name in paths:
        path = Path(name)
        if path.suffix != ".dcm":
            continue
        try:
            meta, _ = split_dataset(path)
        except Exception:  # not even a readable preamble/meta: nothing an SCU could send
            continue
        if path.stem in stems:
            continue  # outcomes are keyed by file stem; a few names repeat across folders
        if all(k in meta for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                                   "TransferSyntaxUID")):
            out[path] = str(meta.MediaStorageSOPInstanceUID)
            stems.add(path.stem)
    return out


def _send_in_batches(agent: AgentProcess, files: list[Path]) -> dict[str, int | str]:
    outcomes: dict[str, int | str] = {}
    for start in range(0, len(files), BATCH):
        batch = files[start : start + BATCH]
        outcomes.update(send_raw("127.0.0.1", agent.port, batch, called_aet="CXRAUDIT"))
        agent.check_alive()
        assert echo(agent.port) == 0, f"listener not answering C-ECHO after batch {start}"
    return outcomes


def test_pydicom_test_files_and_mutations_never_kill_the_listener(tmp_path: Path) -> None:
    claimed = _sendable(get_testdata_files())
    pydicom_files = list(claimed)
    assert len(pydicom_files) > 50, "pydicom's test files are not installed"
    mutations = [valid_reference(), *corpus()]
    mutation_files = [m.write(tmp_path / "mutations") for m in mutations]
    sop_of = {p.stem: uid for p, uid in claimed.items()}
    sop_of.update({m.name: m.sop_instance_uid for m in mutations})
    # "ignore" makes the agent accept every storage class, so the header reader and the
    # worker see the whole collection instead of the association rejecting most of it.
    with running_agent(tmp_path / "agent", {"scp": {"unknown_sop_class": "ignore"}}) as agent:
        warm = _send_in_batches(agent, pydicom_files[:BATCH])
        rss_before = agent.rss_kib()
        outcomes = {**warm, **_send_in_batches(agent, pydicom_files[BATCH:])}
        outcomes.update(_send_in_batches(agent, mutation_files))
        rss_after = agent.rss_kib()
        # The worker audits what was stored; wait until every job is done or dead-lettered.
        wait_until(
            lambda: not agent.db_query(
                "SELECT id FROM jobs WHERE state NOT IN ('done', 'dead')"
            ),
            timeout=120,
            what="the worker to drain",
            alive=agent.check_alive,
        )
        agent.check_alive()
        assert echo(agent.port) == 0
        health = agent.healthz()
        log = agent.log_text()
        rows = {r["sop_instance_uid"]: r for r in agent.db_query("SELECT * FROM instances")}
        jobs = agent.db_query("SELECT state, last_error FROM jobs")

    # A request whose Affected SOP Instance UID exceeds 64 characters does not decode as a
    # DIMSE message (PS3.7 §9.3.1.1): pynetdicom aborts the association (A-ABORT) and logs
    # it; that refusal happens below the C-STORE handler, so it carries no status.
    assert outcomes.pop("uid_sop_too_long") == NO_RESPONSE
    assert "Received an invalid DIMSE message" in log
    unclear = {k: v for k, v in outcomes.items()
               if v != STORED and v not in REFUSALS and v != CONTEXT_REJECTED}
    assert not unclear, f"outcomes without a clear status: {unclear}"
    refused = [k for k, v in outcomes.items() if v in REFUSALS]
    stored = [k for k, v in outcomes.items() if v == STORED]
    assert outcomes["valid"] == STORED
    # Every refusal and every store has its log line; every stored instance has its state row.
    assert log.count("C-STORE refused") >= len(refused)
    assert log.count("instance.stored") >= len(stored)
    unrecorded = [name for name in stored if sop_of[name] not in rows]
    assert not unrecorded, unrecorded
    assert health is not None and health["serving"] is True
    ours = [line for line in log.splitlines() if "/dicom_agent/" in line or "/cxr_auditor/" in line]
    assert not ours, "a traceback through the agent's code:\n" + "\n".join(ours)
    dead = [r["last_error"] for r in jobs if r["state"] == "dead"]
    assert all(dead), "a dead-lettered job without its error"
    assert rss_after - rss_before < RSS_GROWTH_KIB, (rss_before, rss_after)
    by_outcome: dict[str, int] = {}
    for value in outcomes.values():
        key = f"0x{value:04X}" if isinstance(value, int) else value
        by_outcome[key] = by_outcome.get(key, 0) + 1
    print(f"bad input: {len(pydicom_files)} pydicom files + {len(mutations)} mutations; "
          f"outcomes {dict(sorted(by_outcome.items()))} + 1 A-ABORT; "
          f"RSS {rss_before // 1024} -> {rss_after // 1024} MiB")

    # Path-shaped and non-UID UIDs are never stored; each is quarantined with its reason.
    for name in ("uid_sop_traversal", "uid_sop_dotdot", "uid_study_traversal",
                 "uid_study_absolute", "uid_series_backslash", "uid_sop_letters",
                 "uid_study_empty", "uid_study_missing"):
        assert outcomes[name] in REFUSALS, (name, outcomes[name])
    reasons = list((tmp_path / "agent" / "var" / "quarantine").glob("*.reason.txt"))
    assert len(reasons) >= len([k for k, v in outcomes.items() if v in (0xC210, 0xA900)])


# -- drafts ---------------------------------------------------------------------------------------


def _final_place(drafts: Path, name: str) -> str | None:
    """``processed`` or ``rejected`` when a file of that (sanitised) name landed there."""
    from dicom_agent.inbox import safe_name

    stem = safe_name(name).rsplit(".", 1)[0]
    for where in ("processed", "rejected"):
        if any(p.name.startswith(stem) and not p.name.endswith(".reason.txt")
               for p in (drafts / where).glob("*")):
            return where
    return None


def test_hostile_drafts_end_processed_or_rejected(tmp_path: Path) -> None:
    with running_agent(tmp_path, {"drafts": {"max_bytes": 4096}}) as agent:
        drafts = agent.path("drafts")
        hostile: dict[str, bytes] = {
            # Nested deeper than Python's recursion limit, under max_bytes; sorts first, so a
            # reader that chokes on it would never reach the drafts behind it.
            "0000-deep.json": b"[" * 1500 + b"]" * 1500,
            "EMPTY01.txt": b"",
            "BINARY01.txt": bytes(range(256)),
            "HUGE01.txt": b"pleural effusion. " * 1000,
            "LATIN01.txt": "Épanchement pleural".encode("latin-1"),
            "a\\..\\..\\evil.txt": b"No pneumothorax.",
            "ACC..01.txt": b"No pneumothorax.",
            "traversal.json": b'{"study_instance_uid": "../../../etc", "text": "Normal."}',
            "absolute.json": b'{"accession_number": "/etc/passwd", "text": "Normal."}',
            "extra.json": b'{"accession_number": "ACC9", "text": "x", "path": "../x"}',
            "notes.docx": b"PK\x03\x04",
        }
        for name, data in hostile.items():
            (drafts / name).write_bytes(data)
        # A file name that is not UTF-8 (as a Windows share may produce), valid JSON inside.
        raw_name = os.fsencode(drafts) + b"/\xff\xfeNAME.json"
        with open(raw_name, "wb") as fh:
            fh.write(b'{"accession_number": "RAWNAME01", "text": "No pneumothorax."}')
        # Duplicate names: the same file name dropped twice with different content.
        (drafts / "DUP01.txt").write_text("Small left pleural effusion.")
        wait_until(lambda: not (drafts / "DUP01.txt").exists(), timeout=30,
                   what="first DUP01", alive=agent.check_alive)
        (drafts / "DUP01.txt").write_text("No pleural effusion.")
        # Rewritten while watched: appended to for longer than drafts.stable_seconds.
        growing = drafts / "GROW01.txt"
        for k in range(8):
            with growing.open("a") as fh:
                fh.write(f"Line {k}. ")
            time.sleep(0.1)
        final_text = growing.read_text()
        good = drafts / "ZZZ-GOOD.json"
        good.write_text('{"accession_number": "GOOD01", "text": "No acute findings."}')

        names = [*hostile, "DUP01.txt", "GROW01.txt", "ZZZ-GOOD.json"]
        wait_until(lambda: all(not (drafts / n).exists() for n in names)
                   and not os.path.exists(raw_name), timeout=60,
                   what="every draft to leave the drafts folder", alive=agent.check_alive)
        places = {n: _final_place(drafts, n) for n in names}
        rows = agent.db_query("SELECT key, file_name, text FROM drafts")
        agent.check_alive()

    assert places["ZZZ-GOOD.json"] == "processed"
    for name in ("0000-deep.json", "EMPTY01.txt", "BINARY01.txt", "HUGE01.txt", "LATIN01.txt",
                 "a\\..\\..\\evil.txt", "traversal.json", "absolute.json", "extra.json",
                 "notes.docx"):
        assert places[name] == "rejected", (name, places[name])
    assert places["ACC..01.txt"] == "processed"  # an odd but valid SH accession
    dup = sorted(p.name for p in (drafts / "processed").glob("DUP01*"))
    assert len(dup) == 2, dup  # both versions kept, neither overwritten
    assert [r["key"] for r in rows if r["key"] == "RAWNAME01"] == ["RAWNAME01"]
    grow = [r for r in rows if r["key"] == "GROW01"]
    assert [r["text"] for r in grow] == [final_text]  # read once, complete
    reasons = list((drafts / "rejected").glob("*.reason.txt"))
    assert len(reasons) == 10
    assert all(r.read_text().startswith("reason: ") for r in reasons)
