"""The running agent under faults: nothing acknowledged is lost, nothing is duplicated.

Every scenario starts ``cxr-agent serve`` as a subprocess (:mod:`tests.support.agentproc`), hurts it
(SIGKILL mid-send, mid-audit and mid-output; a destination PACS that is down; a disk under
the free-space floor; a model backend that fails or hangs; peers that stall or abort) and
checks the durable state afterwards through the spool, the state DB, ``out/`` and the CLI.

The strace scenario proves the acknowledgement order on the real process: for every
instance, ``fsync(temp file)`` → ``rename(temp, final)`` → ``fsync(folder)`` → SQLite's WAL
sync all complete before the C-STORE-RSP is written to the association socket. How the
response is recognised in the trace is explained in :func:`store_responses`.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.support.agentproc import (
    AgentProcess,
    StubModelServer,
    deep_merge,
    echo,
    make_study,
    store,
    wait_until,
)
from tests.support.mutations import corpus, send_raw
from tests.support.orthanc import ORTHANC, OrthancServer, start_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# -- strace trace parsing ----------------------------------------------------------------------

# ``strace -f -tt -xx`` lines: "<tid> <hh:mm:ss.us> <body>"; -xx prints every byte of a string
# argument as \xNN, so paths and buffers decode without guessing at escapes.
STRACE_CALLS = (
    "openat,close,write,writev,fsync,fdatasync,rename,renameat,renameat2,sendto,sendmsg"
)
_LINE = re.compile(r"^(\d+)\s+\d\d:\d\d:\d\d\.\d+\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_COMPLETE = re.compile(r"^(\w+)\((.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)(?:\s.*)?$")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_C_STORE_RSP = 0x8001  # Command Field of a C-STORE response (PS3.7 Table 9.3-2)


@dataclass
class Syscall:
    """One traced system call; ``start``/``end`` are line numbers (entry and return)."""

    start: int
    end: int
    tid: int
    name: str
    args: str
    ret: int
    strings: list[bytes] = field(default_factory=list)
    path: str | None = None  # the file an fd argument refers to (None: a socket or unknown)
    paths: list[str] = field(default_factory=list)  # resolved path arguments (open, rename)

    @property
    def fd(self) -> int | None:
        m = re.match(r"\s*(\d+)", self.args)
        return int(m.group(1)) if m else None


def _decode(hexed: str) -> bytes:
    return bytes.fromhex(hexed.replace("\\x", ""))


def parse_strace(text: str, cwd: Path) -> list[Syscall]:
    """Parse an ``strace -f -tt -xx`` trace into calls ordered by their return.

    Lines of one thread interrupted by another (``<unfinished ...>`` / ``<... resumed>``) are
    joined. Each fd is mapped to the path its ``openat`` returned it for, until its
    ``close``; fds never opened by path (accepted sockets) map to None.
    """
    pending: dict[int, tuple[int, str, str]] = {}
    calls: list[Syscall] = []
    for number, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw)
        if not m:
            continue
        tid, body = int(m.group(1)), m.group(2)
        if um := _UNFINISHED.match(body):
            pending[tid] = (number, um.group(1), um.group(2))
            continue
        if rm := _RESUMED.match(body):
            if tid not in pending:
                continue
            start, name, head = pending.pop(tid)
            args = head + rm.group(2)
        elif cm := _COMPLETE.match(body):
            start, name, args = number, cm.group(1), cm.group(2)
        else:
            continue  # signals, exits
        result = _RESULT.search(args)
        if result is None:
            continue
        calls.append(
            Syscall(
                start=start,
                end=number,
                tid=tid,
                name=name,
                args=args[: result.start()],
                ret=int(result.group(1)),
                strings=[_decode(s) for s in _STRING.findall(args[: result.start()])],
            )
        )
    calls.sort(key=lambda c: c.end)
    fds: dict[int, str] = {}
    for call in calls:
        # Relative paths resolve against the working directory (dir-fd variants: the folder).
        base = str(cwd) if not call.fd or call.args.startswith("AT_FDCWD") else fds.get(call.fd, str(cwd))
        if call.name == "openat" and call.ret >= 0 and call.strings:
            call.path = str(Path(base, call.strings[0].decode("utf-8", "replace")))
            fds[call.ret] = call.path
        elif call.name == "close" and call.fd is not None:
            call.path = fds.pop(call.fd, None)
        elif call.name.startswith("rename") and len(call.strings) == 2:
            call.paths = [str(Path(base, s.decode("utf-8", "replace"))) for s in call.strings]
            call.path = call.paths[1]
        elif call.fd is not None:
            call.path = fds.get(call.fd)
    return calls


@dataclass(frozen=True)
class StoreResponse:
    call: Syscall
    sop_instance_uid: str
    status: int


def _command_elements(command: bytes) -> dict[int, bytes]:
    """Elements of a DIMSE command set (always Implicit VR Little Endian, PS3.7 §6.3.1)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack("<HHI", command[pos : pos + 8])
        out[(group << 16) | elem] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def store_responses(calls: list[Syscall]) -> list[StoreResponse]:
    """The C-STORE-RSP messages the process wrote to its sockets.

    A write to an fd that no ``openat`` produced (an association socket) whose buffer is a
    P-DATA-TF PDU (type 0x04, PS3.8 §9.3.5) is split into its PDV items; the items whose
    message control header marks a command fragment (bit 0) are joined and decoded as a
    command set. When its Command Field (0000,0100) is 0x8001 the write is the C-STORE
    response for the Affected SOP Instance UID (0000,1000), with status (0000,0900). Requires
    strace's ``-s`` to cover the whole PDU (a response is ~200 bytes).
    """
    out: list[StoreResponse] = []
    for call in calls:
        if call.name not in ("sendto", "write", "writev", "sendmsg") or call.path is not None:
            continue
        if not call.strings or not call.strings[0] or call.strings[0][0] != 0x04:
            continue
        pdu = b"".join(call.strings)
        command = b""
        pos = 6
        while pos + 6 <= len(pdu):
            (item_len,) = struct.unpack(">I", pdu[pos : pos + 4])
            header = pdu[pos + 5]
            if header & 0x01:
                command += pdu[pos + 6 : pos + 4 + item_len]
            pos += 4 + item_len
        elements = _command_elements(command)
        field_ = elements.get(0x00000100)
        if field_ is None or struct.unpack("<H", field_[:2])[0] != _C_STORE_RSP:
            continue
        uid = elements.get(0x00001000, b"").rstrip(b"\x00").decode("ascii", "replace")
        status = struct.unpack("<H", elements.get(0x00000900, b"\xff\xff")[:2])[0]
        out.append(StoreResponse(call=call, sop_instance_uid=uid, status=status))
    return out


@dataclass(frozen=True)
class DurableOrder:
    """Line numbers proving one acknowledged instance was durable before its response."""

    file_sync: int
    rename: int
    dir_sync: int
    state_sync: int
    response: int


def prove_durable_before_ack(
    calls: list[Syscall], response: StoreResponse, spool: Path, state_db: Path
) -> DurableOrder:
    """Check the write-ahead order for one successful C-STORE; raise AssertionError if not.

    Before the response write *starts*, these must all have *returned*: the rename onto
    ``<spool>/.../<SOPInstanceUID>.dcm``; an fsync/fdatasync of the renamed temp file that
    returned before the rename started; an fsync of the final file's folder after the rename;
    and a sync of SQLite's WAL (or database) file after the rename (the state row commit).
    """
    before = response.call.start
    name = f"{response.sop_instance_uid}.dcm"
    renames = [
        c
        for c in calls
        if c.name.startswith("rename")
        and c.ret == 0
        and c.end < before
        and c.path is not None
        and Path(c.path).name == name
        and Path(c.path).is_relative_to(spool)
    ]
    assert renames, f"no rename onto {name} before its C-STORE-RSP"
    rename = renames[-1]
    final = Path(rename.path or "")
    temp = rename.paths[0]
    syncs = [c for c in calls if c.name in ("fsync", "fdatasync") and c.ret == 0]
    file_syncs = [c for c in syncs if c.path == temp and c.end < rename.start]
    assert file_syncs, f"temp file of {name} not fsynced before its rename"
    dir_syncs = [
        c for c in syncs if c.path == str(final.parent) and rename.end < c.start and c.end < before
    ]
    assert dir_syncs, f"folder of {name} not fsynced between rename and response"
    state_syncs = [
        c
        for c in syncs
        if c.path is not None
        and c.path.startswith(str(state_db))
        and rename.end < c.start
        and c.end < before
    ]
    assert state_syncs, f"state DB not synced between the rename of {name} and its response"
    return DurableOrder(
        file_sync=file_syncs[-1].end,
        rename=rename.end,
        dir_sync=dir_syncs[0].end,
        state_sync=state_syncs[0].end,
        response=before,
    )


def test_order_prover_rejects_an_early_response(tmp_path: Path) -> None:
    """The prover is not vacuous: a response written before the folder sync fails it."""
    uid = "1.2.3.4"
    spool = tmp_path / "spool"
    final = spool / "1.2" / "1.3" / f"{uid}.dcm"
    temp = final.parent / f".{uid}.ab.tmp"
    state = tmp_path / "agent.sqlite3"

    def hexed(data: bytes) -> str:
        return "".join(f"\\x{b:02x}" for b in data)

    command = b"".join(
        struct.pack("<HHI", 0, elem, len(value)) + value
        for elem, value in (
            (0x0100, struct.pack("<H", _C_STORE_RSP)),
            (0x0900, struct.pack("<H", 0)),
            (0x1000, uid.encode() + b"\x00"),
        )
    )
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command
    pdu = b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv
    good = [
        f'openat(AT_FDCWD, "{hexed(bytes(str(temp), "ascii"))}", O_WRONLY|O_CREAT) = 7',
        "fsync(7) = 0",
        "close(7) = 0",
        f'rename("{hexed(bytes(str(temp), "ascii"))}", "{hexed(bytes(str(final), "ascii"))}") = 0',
        f'openat(AT_FDCWD, "{hexed(bytes(str(final.parent), "ascii"))}", O_RDONLY) = 8',
        "fsync(8) = 0",
        f'openat(AT_FDCWD, "{hexed(bytes(str(state) + "-wal", "ascii"))}", O_RDWR) = 9',
        "fdatasync(9) = 0",
        f'sendto(5, "{hexed(pdu)}", {len(pdu)}, 0, NULL, 0) = {len(pdu)}',
    ]

    def trace(lines: list[str]) -> list[Syscall]:
        text = "\n".join(f"100 12:00:00.{n:06d} {line}" for n, line in enumerate(lines))
        return parse_strace(text, tmp_path)

    calls = trace(good)
    (response,) = store_responses(calls)
    assert response.sop_instance_uid == uid and response.status == 0
    order = prove_durable_before_ack(calls, response, spool, state)
    assert order.file_sync < order.rename < order.dir_sync < order.state_sync < order.response
    early = good[:5] + [good[8]] + good[5:8]  # response before the folder and WAL syncs
    calls = trace(early)
    with pytest.raises(AssertionError, match="not fsynced between rename and response"):
        prove_durable_before_ack(calls, store_responses(calls)[0], spool, state)


# -- scenarios against the running agent -------------------------------------------------------

NORMAL_DRAFT = "FINDINGS: Lungs are clear. No pleural effusion or pneumothorax.\n"


def _spool_files(agent: AgentProcess) -> dict[str, Path]:
    return {p.stem: p for p in agent.path("spool").rglob("*.dcm")}


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def test_sigkill_mid_send_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    """8 parallel associations; SIGKILL once ~40% are acknowledged; restart; resend the rest.

    Audits wait for drafts (``no_draft_policy: wait``) until every instance is in, so each
    study is audited exactly once, over exactly its instances.
    """
    senders, studies_per_sender, images = 8, 2, 4
    agent = AgentProcess(tmp_path, {
        "pairing": {"no_draft_policy": "wait", "draft_wait_seconds": 3600},
    })
    studies = [
        make_study(images, accession=f"KILL{s:02d}{k}", size=96)
        for s in range(senders) for k in range(studies_per_sender)
    ]
    total = len(studies) * images
    acked: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def on_status(ds: Dataset, status: int) -> None:
        with lock:
            if status == 0:
                acked.add(ds.SOPInstanceUID)
            if len(acked) >= total * 0.4 and not killed.is_set():
                killed.set()
                agent.kill()

    def send(share: list[list[Dataset]]) -> None:
        for study in share:
            store(agent.port, study, on_status=on_status, timeout=10)

    agent.start()
    try:
        threads = [
            threading.Thread(target=send, args=(studies[i::senders],)) for i in range(senders)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert killed.is_set(), "the agent was never killed: raise the instance count"
        with lock:
            acked_before_kill = set(acked)
        assert 0 < len(acked_before_kill) < total

        agent.start()
        stored = _spool_files(agent)
        rows = {r["sop_instance_uid"] for r in agent.db_query("SELECT sop_instance_uid FROM instances")}
        missing = acked_before_kill - set(stored)
        assert not missing, f"{len(missing)} acknowledged instances lost from the spool"
        assert acked_before_kill <= rows, "acknowledged instances without a state row"
        for uid in acked_before_kill:
            assert dcmread(stored[uid], stop_before_pixels=True).SOPInstanceUID == uid
        assert not _temp_files(agent.path("spool")), "temp files survived the restart"

        # The senders' unacknowledged instances succeed when resent (acknowledged ones are
        # resent too, as a real PACS would after an aborted association: duplicates are no-ops).
        resent = [store(agent.port, study) for study in studies]
        assert all(s == 0 for statuses in resent for s in statuses), resent
        for study in studies:
            agent.drop_draft(f"{study[0].AccessionNumber}.txt", NORMAL_DRAFT)
        uids = [study[0].StudyInstanceUID for study in studies]
        wait_until(lambda: all(agent.result(u) for u in uids), timeout=120,
                   what="every study's result", interval=0.5, alive=agent.check_alive)
        jobs = agent.db_query("SELECT study_instance_uid AS s, state FROM jobs WHERE kind='audit'")
        for study, uid in zip(studies, uids, strict=True):
            result = agent.result(uid)
            assert result is not None
            audited = sorted(img["sop_instance_uid"] for img in result["inputs"]["images"])
            assert audited == sorted(ds.SOPInstanceUID for ds in study), "audit inputs differ"
            assert agent.versions(uid) == [1], f"study audited {agent.versions(uid)} times"
            assert [j["state"] for j in jobs if j["s"] == uid] == ["done"]
        assert len(_spool_files(agent)) == total  # nothing duplicated
        report = {"acknowledged_before_kill": len(acked_before_kill), "total": total}
        (tmp_path / "figures.json").write_text(json.dumps(report))
        print(f"SIGKILL mid-send: {report}")
    finally:
        agent.stop()


def test_acknowledgement_follows_fsync_rename_dirsync_and_commit(tmp_path: Path) -> None:
    """strace the agent during a 2-association send; prove the order for every instance."""
    trace = tmp_path / "strace.txt"
    agent = AgentProcess(
        tmp_path / "agent",
        {"pairing": {"no_draft_policy": "wait", "draft_wait_seconds": 3600}},
        wrapper=["strace", "-f", "--seccomp-bpf", "-tt", "-xx", "-s", "4096",
                 "-e", f"trace={STRACE_CALLS}", "-o", str(trace)],
    )
    studies = [make_study(5, accession=f"TRACE{k}", size=64) for k in range(2)]
    agent.start(timeout=120)
    try:
        threads = [threading.Thread(target=store, args=(agent.port, s)) for s in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        agent.stop()
    calls = parse_strace(trace.read_text(), agent.root)
    responses = [r for r in store_responses(calls) if r.status == 0]
    sent = {ds.SOPInstanceUID for s in studies for ds in s}
    assert {r.sop_instance_uid for r in responses} == sent
    spool = agent.path("spool").resolve()
    state_db = Path(agent.config["paths"]["state"]).resolve()
    orders = [prove_durable_before_ack(calls, r, spool, state_db) for r in responses]
    assert len(orders) == len(sent) == 10
    print(f"strace: {len(orders)} acknowledgements, each after fsync, rename, dir fsync, WAL sync")


def _stub_agent(tmp_path: Path, stub: StubModelServer, overrides: dict | None = None,
                *, timeout_seconds: float = 2.0) -> AgentProcess:
    """An agent whose grounding profile talks to ``stub`` (profile file in the root)."""
    profiles = tmp_path / "profiles"
    name = stub.write_profile(profiles, timeout_seconds=timeout_seconds)
    base = {"paths": {"profiles": str(profiles)}, "grounding": {"profile": name}}
    return AgentProcess(tmp_path / "agent", deep_merge(base, overrides or {}))


def _output_problems(out: Path) -> list[str]:
    """Files under out/ that are temp names or do not parse as what their name says."""
    from PIL import Image

    problems = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        try:
            if path.name.endswith(".tmp") or path.name.startswith("."):
                problems.append(f"temp file left: {path.relative_to(out)}")
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".dcm":
                dcmread(path).SOPInstanceUID  # noqa: B018 - parse the whole object
            elif path.suffix == ".png":
                with Image.open(path) as img:
                    img.load()
        except Exception as exc:  # any parse failure is a half-written file
            problems.append(f"{path.relative_to(out)}: {type(exc).__name__}")
    return problems


def test_sigkill_during_audit_and_output_writing_redoes_the_job_once(tmp_path: Path) -> None:
    """Kill while the model works, then repeatedly just after it answered (outputs being
    written); after the last restart the study has exactly one complete result version."""
    stub = StubModelServer("ok", delay=1.0)
    agent = _stub_agent(tmp_path, stub)
    study = make_study(2, accession="CRASH01", size=128)
    uid = study[0].StudyInstanceUID
    agent.start()
    try:
        agent.drop_draft("CRASH01.txt", NORMAL_DRAFT)
        assert store(agent.port, study) == [0, 0]
        # 1: the model is working on the batch.
        wait_until(lambda: stub.requests, timeout=60, what="the model request",
                   alive=agent.check_alive)
        agent.kill()
        kills, temps_after_kills = 1, 0
        # 2..: while audit.json/SR/GSPS/SC/PNG are being written: the version folder has
        # just appeared, then holds its first file, then three (polled every 2 ms).
        stub.delay = 0.0
        version = agent.path("out") / uid / "v1"
        def writing(files: int) -> bool:
            if agent.result(uid):
                return True
            return version.is_dir() and len(
                [p for p in version.iterdir() if not p.name.startswith(".")]
            ) >= files

        for written in (0, 1, 3):
            agent.start()
            wait_until(partial(writing, written), timeout=60, what="outputs being written",
                       interval=0.002, alive=agent.check_alive)
            if agent.result(uid):
                break  # the writing finished between two polls: nothing left to interrupt
            agent.kill()
            kills += 1
            # Right after the crash: temp names may be there, but no visible half file.
            seen = _output_problems(agent.path("out"))
            temps_after_kills += sum("temp file left" in p for p in seen)
            assert all("temp file left" in p for p in seen), seen
        # A kill inside atomic_write_bytes leaves its temp file (".<name>.<random>.tmp"); the
        # 2 ms polls above rarely land inside one, so leave one exactly as such a kill would.
        agent.kill()
        version.mkdir(parents=True, exist_ok=True)
        (version / ".sr.dcm.k1ll3d.tmp").write_bytes(b"\x00" * 128 + b"DICM")
        # The same for a refused data set being copied into the quarantine.
        agent.path("quarantine").mkdir(parents=True, exist_ok=True)
        quarantine_temp = agent.path("quarantine") / ".20261207T000000-k1ll3d.bin.ab12.tmp"
        quarantine_temp.write_bytes(b"\x00" * 64)
        agent.start()
        wait_until(lambda: agent.result(uid), timeout=60, what="the result",
                   alive=agent.check_alive)
        wait_until(lambda: not _temp_files(agent.path("out")), timeout=10,
                   what="temp files under out/ to be cleaned", alive=agent.check_alive)
        assert not quarantine_temp.exists()
        jobs = agent.db_query("SELECT state FROM jobs WHERE kind='audit'")
        problems = _output_problems(agent.path("out"))
        versions = agent.versions(uid)
        srs = list((agent.path("out") / uid).glob("v*/sr.dcm"))
    finally:
        agent.stop()
        stub.stop()
    assert kills >= 2
    assert not problems, problems
    assert versions == [1]
    assert len(srs) == 1
    assert [j["state"] for j in jobs] == ["done"]
    print(f"SIGKILL during audit/outputs: {kills} kills, {temps_after_kills} temp files seen "
          f"after them, 1 version, {len(stub.requests)} model calls")


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_model_backend_failure_dead_letters_while_ingest_continues(
    tmp_path: Path, mode: str
) -> None:
    stub = StubModelServer(mode)
    agent = _stub_agent(
        tmp_path, stub,
        {"worker": {"max_attempts": 3, "retry_backoff_seconds": 0.2,
                    "retry_backoff_max_seconds": 0.5}},
        timeout_seconds=1.0,
    )
    agent.start()
    try:
        study = make_study(1, accession="MODEL01", size=64)
        agent.drop_draft("MODEL01.txt", NORMAL_DRAFT)
        assert store(agent.port, study) == [0]
        wait_until(lambda: stub.requests, timeout=60, what="a model request",
                   alive=agent.check_alive)
        # Ingest is unaffected while the backend fails or hangs.
        later = make_study(2, accession="MODEL02", size=64)
        assert store(agent.port, later) == [0, 0]
        assert echo(agent.port) == 0
        dead = wait_until(
            lambda: agent.db_query("SELECT * FROM jobs WHERE kind='audit' AND state='dead'"),
            timeout=90, what="the dead letter", interval=0.5, alive=agent.check_alive,
        )
        status = agent.status()
    finally:
        agent.stop()
        stub.stop()
    assert dead[0]["attempts"] == 3
    expected = "HTTP 500" if mode == "error" else "Timeout"
    assert expected in (dead[0]["last_error"] or "")
    shown = status["dead_jobs"]
    assert shown and expected in shown[0]["error"], shown
    assert len(stub.requests) >= 3  # one call per attempt at least: retried, not given up
    assert agent.result(study[0].StudyInstanceUID) is None


def test_free_space_floor_refuses_with_out_of_resources_then_recovers(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", {"scp": {"min_free_bytes": 1 << 60}})  # 1 EiB
    study = make_study(3, accession="FULL01", size=64)
    agent.start()
    try:
        assert store(agent.port, study) == [0xA700] * 3
        assert not list(agent.path("spool").rglob("*.dcm"))
        assert not _temp_files(agent.path("spool"))
        assert not agent.db_query("SELECT * FROM instances")
        assert "out of resources" in agent.log_text().lower()
        # Refused input is not kept either while below the floor: the quarantine must not be
        # the way a peer fills the disk.
        bad = next(m for m in corpus() if m.name == "uid_sop_traversal").write(tmp_path / "in")
        (outcome,) = send_raw("127.0.0.1", agent.port, [bad], called_aet="CXRAUDIT").values()
        assert outcome in (0xA700, 0xC210)
        assert not [p for p in agent.path("quarantine").rglob("*") if p.is_file()]
        agent.stop()
        agent.config["scp"]["min_free_bytes"] = 0  # space came back
        agent.write_config()
        agent.start()
        assert store(agent.port, study) == [0, 0, 0]
        assert len(list(agent.path("spool").rglob("*.dcm"))) == 3
    finally:
        agent.stop()


def _partial_store(port: int, ds: Dataset, *, fragments: int, then: str) -> None:
    """Associate, send the C-STORE-RQ command and the first ``fragments`` P-DATA-TF PDUs of
    the data set, then ``stall`` (send nothing more) or ``abort`` (A-ABORT, PS3.8 §7.3)."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF

    ae = AE(ae_title="STALLER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRAUDIT", max_pdu=8192)
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    encoded = encode(ds, False, True)  # Explicit VR Little Endian
    assert encoded is not None
    req.DataSet = BytesIO(encoded)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None and assoc.dul.socket is not None
    sock = assoc.dul.socket.socket
    assert sock is not None
    for n, primitive in enumerate(msg.encode_msg(context_id, 8192)):
        if n >= fragments:
            break
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.sendall(pdu.encode())
    if then == "abort":
        assoc.abort()


@pytest.mark.parametrize("then", ["stall", "abort"])
def test_stalled_or_aborting_peer_leaves_nothing_and_blocks_no_one(
    tmp_path: Path, then: str
) -> None:
    agent = AgentProcess(tmp_path, {"scp": {"acse_timeout_seconds": 2, "dimse_timeout_seconds": 2,
                                            "network_timeout_seconds": 2}})
    victim = make_study(1, accession="STALL01", size=256)[0]  # 128 KiB: many 8 KiB PDUs
    agent.start()
    try:
        # A peer that connects and never speaks: the ACSE timer ends it.
        silent = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        t0 = time.monotonic()
        staller = threading.Thread(target=_partial_store,
                                   args=(agent.port, victim), kwargs={"fragments": 4, "then": then})
        staller.start()
        # Other associations are served meanwhile.
        other = make_study(2, accession="STALL02", size=64)
        assert store(agent.port, other) == [0, 0]
        assert echo(agent.port) == 0
        assert silent.recv(1024) == b""  # closed by the agent, not by us
        silent_closed_after = time.monotonic() - t0
        staller.join(30)
        wait_until(lambda: "association aborted with STALLER" in agent.log_text(), timeout=30,
                   what="the aborted association in the log", alive=agent.check_alive)
        spool_names = {p.stem for p in agent.path("spool").rglob("*.dcm")}
        rows = {r["sop_instance_uid"] for r in agent.db_query("SELECT * FROM instances")}
        leftovers = _temp_files(agent.path("spool"))
        agent.check_alive()
    finally:
        agent.stop()
    assert victim.SOPInstanceUID not in spool_names | rows
    assert {ds.SOPInstanceUID for ds in other} <= spool_names & rows
    assert not leftovers
    assert silent_closed_after < 15


def _relaunch(server: OrthancServer) -> OrthancServer:
    """Start a stopped Orthanc again from the same config file (same ports and storage)."""
    assert ORTHANC is not None
    with (server.folder / "orthanc.log").open("ab") as log:
        process = subprocess.Popen([ORTHANC, str(server.folder / "orthanc.json")], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=server.folder)
    again = OrthancServer(server.folder, server.ae_title, server.dicom_port, server.http_port,
                          process)

    def answering() -> bool:  # a C-ECHO on its DICOM port and its REST API
        try:
            return (echo(again.dicom_port, called_aet=again.ae_title) == 0
                    and again.client.get("/system").status_code == 200)
        except httpx.HTTPError:
            return False

    try:
        wait_until(answering, timeout=30, what="Orthanc to answer", interval=0.1)
    except TimeoutError:
        again.stop()
        raise
    return again


def test_results_wait_in_the_outbox_while_the_pacs_is_down(tmp_path: Path) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc")  # fixes its ports and config, then goes down
    orthanc.stop()
    # While "down", its ports stay bound but not listening: connections are refused, and no
    # other process on this shared machine can start a server there in the meantime.
    placeholders = []
    for port in (orthanc.dicom_port, orthanc.http_port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", port))
        placeholders.append(sock)
    agent = AgentProcess(tmp_path / "agent", {"forward": {
        "enabled": True,
        "max_attempts": 100,
        "retry_backoff_seconds": 0.3,
        "retry_backoff_max_seconds": 1,
        "destinations": [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "research": True}],
    }})
    study = make_study(1, accession="DOWN01", size=128)
    uid = study[0].StudyInstanceUID
    agent.start()
    try:
        assert store(agent.port, study) == [0]
        agent.drop_draft("DOWN01.txt", NORMAL_DRAFT)
        audit = wait_until(lambda: agent.result(uid), timeout=60, what="the audit",
                           alive=agent.check_alive)
        held = wait_until(
            lambda: agent.db_query("SELECT * FROM jobs WHERE kind='forward' AND attempts >= 2"
                                   " AND state != 'done'"),
            timeout=60, what="forward retries while the PACS is down", alive=agent.check_alive,
        )
        assert all(j["last_error"] for j in held), held
        for sock in placeholders:
            sock.close()
        orthanc = _relaunch(orthanc)
        wanted = set(audit["outputs"].values())
        arrived = wait_until(
            lambda: wanted <= {i["MainDicomTags"]["SOPInstanceUID"]
                               for i in orthanc.study_instances(uid)} and orthanc.study_instances(uid),
            timeout=60, what="results in the PACS", interval=0.5, alive=agent.check_alive,
        )
        # The PACS has the objects a moment before the agent records the job as done.
        forwards = wait_until(
            lambda: [j for j in agent.db_query("SELECT state, attempts FROM jobs"
                                               " WHERE kind='forward'")
                     if j["state"] == "done"],
            timeout=30, what="the forward job done", alive=agent.check_alive,
        )
    finally:
        for sock in placeholders:
            sock.close()
        agent.stop()
        orthanc.stop()
    assert len(arrived) == len(wanted)  # each object once (the source study was never sent)
    print(f"PACS down: held through {max(j['attempts'] for j in forwards)} attempts, "
          f"then {len(arrived)} objects delivered once")


def test_a_backlog_is_not_pulled_into_memory(tmp_path: Path) -> None:
    """When outputs are slower than the model, claimed jobs must not pile up in memory.

    60 studies wait for drafts, then all drafts arrive at once. While the backlog drains, the
    number of jobs the worker holds (``running``: decoded, audited, waiting to be written) must
    stay within a few batches, whatever the backlog; RSS follows that number.
    """
    batch = 2
    agent = AgentProcess(tmp_path, {
        "pairing": {"no_draft_policy": "wait", "draft_wait_seconds": 3600},
        "worker": {"batch_size": batch},
    })
    studies = [make_study(1, accession=f"BACK{k:03d}", size=64) for k in range(60)]
    agent.start()
    try:
        threads = [threading.Thread(target=lambda s=share: [store(agent.port, x) for x in s])
                   for share in (studies[0::2], studies[1::2])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for study in studies:
            agent.drop_draft(f"{study[0].AccessionNumber}.txt", NORMAL_DRAFT)
        peak = 0

        def drained() -> bool:
            nonlocal peak
            rows = {r["state"]: r["n"] for r in agent.db_query(
                "SELECT state, COUNT(*) AS n FROM jobs WHERE kind='audit' GROUP BY state")}
            peak = max(peak, rows.get("running", 0))
            return rows.get("done", 0) == len(studies)

        wait_until(drained, timeout=180, what="the backlog to drain", interval=0.2,
                   alive=agent.check_alive)
    finally:
        agent.stop()
    assert peak <= 4 * batch, f"{peak} jobs held at once with batch_size {batch}"
    print(f"backlog: peak {peak} jobs in memory for a backlog of {len(studies)}")
