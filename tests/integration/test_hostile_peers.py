"""The receive path under hostile and broken peers, driven from outside the real process.

Every scenario talks to a running ``cxr-agent serve`` over loopback with raw sockets or
pynetdicom, kills it with SIGKILL, or fills a real (tmpfs) file system under its spool
(issue 14 items 1-4, 7, 8). Peak memory is the kernel's own high-water mark (VmHWM), reset
before each transfer through ``/proc/<pid>/clear_refs`` (write ``5``, Linux >= 4.0).
docs/reliability.md quotes these tests with their measured outcomes.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_agent.spool import INCOMING_DIR, file_meta_bytes
from tests.integration.test_faults import _partial_store
from tests.integration.test_security import client_context, make_pki
from tests.support.agentproc import AgentProcess, echo, make_study, store, wait_until
from tests.support.mutations import corpus, send_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1 << 20
SOCKET_TIMEOUT = 30.0  # our side of every raw socket; the agent's own timeouts are far shorter
TIMEOUTS = {"acse_timeout_seconds": 5, "dimse_timeout_seconds": 5,
            "network_timeout_seconds": 5, "read_timeout_seconds": 2}


# -- helpers -----------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


@contextmanager
def peak_growth(agent: AgentProcess) -> Iterator[dict[str, int]]:
    """Measure how far the agent's peak RSS rises above its RSS at entry (KiB, in ``["kib"]``)."""
    Path(f"/proc/{agent.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib(agent.pid, "VmRSS")
    out: dict[str, int] = {}
    yield out
    out["kib"] = _status_kib(agent.pid, "VmHWM") - before


def _closed_by_peer(sock: socket.socket) -> bool:
    """Read until the agent closes; True when it did (EOF or reset), False on our timeout."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _temps(agent: AgentProcess) -> list[Path]:
    return [p for p in agent.path("spool").rglob("*.tmp") if p.is_file()]


def _big_cxr(nbytes: int) -> Dataset:
    """A radiograph whose Pixel Data is ``nbytes`` of zeros (16-bit, 4096 columns)."""
    (ds,) = make_study(1, accession="BIG01", size=16)
    ds.Rows, ds.Columns = nbytes // (2 * 4096), 4096
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    return ds


@contextmanager
def small_filesystem(folder: Path, size_mib: int) -> Iterator[Path]:
    """A real tmpfs of ``size_mib`` mounted on ``folder`` (root only; skipped otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# -- item 1: PDU lengths are bounded before anything is allocated --------------------------------


def test_pdu_lengths_are_bounded_before_allocation(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, {"scp": TIMEOUTS})
    agent.start()
    try:
        with peak_growth(agent) as growth:
            # An A-ASSOCIATE-RQ announcing 4 GiB, before any AE title is known (PS3.8 9.3.2).
            with socket.create_connection(("127.0.0.1", agent.port), timeout=SOCKET_TIMEOUT) as s:
                s.sendall(b"\x01\x00\xff\xff\xff\xff")
                assert _closed_by_peer(s)
            # A P-DATA-TF announcing 4 GiB inside an association (PS3.8 9.3.5).
            from pynetdicom import AE

            ae = AE(ae_title="HOSTILE")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SOCKET_TIMEOUT
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", agent.port, ae_title="CXRAUDIT")
            assert assoc.is_established
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            assoc.dul.socket.socket.sendall(b"\x04\x00\xff\xff\xff\xf0")
            wait_until(lambda: not assoc.is_established, timeout=SOCKET_TIMEOUT,
                       what="the agent ending the association", alive=agent.check_alive)
            assert assoc.is_aborted
        assert echo(agent.port) == 0
        log = agent.log_text()
        assert log.count("above the") >= 2, agent.log_tail()
        assert 'cxr_agent_listener_events{event="pdu_too_long"} 2.0' in agent.metrics()
    finally:
        agent.stop()
    # pynetdicom alone zero-filled both announced lengths: 4 GiB of RSS each.
    assert growth["kib"] < 32 * 1024, f"peak RSS rose {growth['kib']} KiB"
    print(f"4 GiB PDU announcements: peak RSS +{growth['kib']} KiB, connection closed")


# -- item 2: stalled and vanishing peers never hold a thread or a slot ---------------------------


def test_stalled_and_vanishing_peers_never_hold_a_slot(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, {"scp": {**TIMEOUTS, "max_associations": 4}})
    agent.start()
    silent: list[socket.socket] = []
    try:
        # Eight connections that never speak (twice max_associations): they hold no slot.
        silent = [socket.create_connection(("127.0.0.1", agent.port), timeout=SOCKET_TIMEOUT)
                  for _ in range(8)]
        assert echo(agent.port) == 0
        # Half an A-ASSOCIATE-RQ, then silence: dropped after read_timeout_seconds.
        with socket.create_connection(("127.0.0.1", agent.port), timeout=SOCKET_TIMEOUT) as s:
            s.sendall(b"\x01\x00\x00\x00\x01\x00" + b"\x00\x01" + b"\x00" * 8)
            assert _closed_by_peer(s), "a peer stalled mid-PDU was not dropped"
        # 200 connections opened and closed at once, half of them with a reset (RST).
        burst = [socket.create_connection(("127.0.0.1", agent.port), timeout=SOCKET_TIMEOUT)
                 for _ in range(200)]
        for n, s in enumerate(burst):
            if n % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        # The very next association is served: no slot leaked to the burst.
        assert echo(agent.port) == 0
        assert store(agent.port, make_study(2, accession="SLOT01", size=64)) == [0, 0]
        agent.check_alive()
    finally:
        for s in silent:
            s.close()
        agent.stop()


def test_peers_trickling_from_one_address_hold_only_their_share(tmp_path: Path) -> None:
    """Associated peers that keep talking within every timeout (here a C-ECHO a second, under
    the 5 s network timeout) are not dropped: one address may hold only
    ``scp.max_associations_per_address`` of the slots, and another host still gets in."""
    from pynetdicom import AE

    agent = AgentProcess(tmp_path, {"scp": {**TIMEOUTS, "max_associations": 4,
                                            "max_associations_per_address": 2}})
    agent.start()
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SOCKET_TIMEOUT
    ae.add_requested_context("1.2.840.10008.1.1")
    stop = threading.Event()
    trickling = []
    talker: threading.Thread | None = None
    try:
        for _ in range(3):  # one more than the address may hold
            assoc = ae.associate("127.0.0.1", agent.port, ae_title="CXRAUDIT")
            if assoc.is_established:
                trickling.append(assoc)

        def keep_talking() -> None:
            while not stop.wait(1.0):
                for assoc in trickling:
                    assoc.send_c_echo()

        talker = threading.Thread(target=keep_talking)
        talker.start()
        assert len(trickling) == 2, "the address got more than its share of slots"
        # Longer than the network timeout: the trickling peers are still associated...
        stop.wait(7)
        assert all(a.is_established for a in trickling)
        # ...and a modality at another address stores while they hold their share.
        study = make_study(2, accession="SHARE01", size=64)
        assert store(agent.port, study, source="127.0.0.2") == [0, 0]
        agent.check_alive()
    finally:
        stop.set()
        if talker is not None:
            talker.join()
        for assoc in trickling:
            assoc.release()
        agent.stop()


def test_half_tls_client_hello_is_dropped(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"enabled": True, "cert_file": str(pki["server_cert"]),
           "key_file": str(pki["server_key"]), "ca_file": str(pki["ca"])}
    agent = AgentProcess(tmp_path / "agent", {"scp": {**TIMEOUTS, "tls": tls}})
    agent.start(wait=False)
    try:
        good = client_context(pki)
        wait_until(lambda: echo(agent.port, tls=good) == 0, timeout=60,
                   what="TLS C-ECHO", alive=agent.check_alive)
        with socket.create_connection(("127.0.0.1", agent.port), timeout=SOCKET_TIMEOUT) as s:
            # A TLS record header announcing a 512-byte ClientHello, then 4 of its bytes.
            s.sendall(b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc")
            assert _closed_by_peer(s), "a half TLS handshake was not dropped"
        assert echo(agent.port, tls=good) == 0
    finally:
        agent.stop()


# -- item 3: data sets stream to disk; size and inflation are capped while bytes arrive ----------


def test_oversize_instance_is_aborted_while_it_arrives_with_bounded_memory(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, {"scp": {**TIMEOUTS, "max_instance_bytes": 32 * MIB}})
    big = _big_cxr(96 * MIB)
    agent.start()
    try:
        with peak_growth(agent) as growth:
            assert store(agent.port, [big]) == [None]  # aborted: no C-STORE response
        assert not _temps(agent)
        assert not agent.db_query("SELECT * FROM instances")
        assert "exceeds scp.max_instance_bytes" in agent.log_text()
        assert store(agent.port, make_study(1, accession="AFTER1", size=64)) == [0]
    finally:
        agent.stop()
    assert growth["kib"] < 24 * 1024, f"peak RSS rose {growth['kib']} KiB for a 96 MiB instance"
    print(f"96 MiB instance over a 32 MiB limit: aborted, peak RSS +{growth['kib']} KiB")


def _deflate_bomb(folder: Path, inflated_bytes: int) -> Path:
    """A Part 10 file in Deflated Explicit VR Little Endian (PS3.5 A.5) whose data set inflates
    to ``inflated_bytes`` (Pixel Data of zeros); about 1/1000 of that on the wire."""
    (ds,) = make_study(1, accession="BOMB01", size=16)
    pixel_bytes = inflated_bytes - 4096
    ds.Rows, ds.Columns = pixel_bytes // (2 * 16384), 16384
    del ds.PixelData
    from pynetdicom.dsutils import encode

    header = encode(ds, False, True)
    assert header is not None
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixel_len = ds.Rows * ds.Columns * 2
    body = deflater.compress(header + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_len))
    zeros = bytes(MIB)
    for _ in range(pixel_len // MIB):
        body += deflater.compress(zeros)
    body += deflater.compress(bytes(pixel_len % MIB)) + deflater.flush()
    meta = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, None)
    path = folder / "bomb.dcm"
    path.write_bytes(meta + body)
    return path


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", {"scp": {**TIMEOUTS, "max_instance_bytes": 64 * MIB}})
    bomb = _deflate_bomb(tmp_path, 1024 * MIB)
    agent.start()
    try:
        with peak_growth(agent) as growth:
            (outcome,) = send_raw("127.0.0.1", agent.port, [bomb], called_aet="CXRAUDIT").values()
        assert outcome == 0xA701
        assert not _temps(agent)
        assert not agent.db_query("SELECT * FROM instances")
    finally:
        agent.stop()
    assert growth["kib"] < 24 * 1024, f"peak RSS rose {growth['kib']} KiB"
    print(f"deflate bomb ({bomb.stat().st_size} B -> 1 GiB): 0xA701, peak RSS +{growth['kib']} KiB")


# -- item 4: Success means readable --------------------------------------------------------------


def test_unreadable_data_sets_are_refused_with_c210_and_quarantined(tmp_path: Path) -> None:
    names = ("rows_vr_garbage", "rows_length_odd", "pixel_vr_us")
    files = [m.write(tmp_path / "in") for m in corpus() if m.name in names]
    assert len(files) == len(names)
    agent = AgentProcess(tmp_path / "agent", {"scp": TIMEOUTS})
    agent.start()
    try:
        outcomes = send_raw("127.0.0.1", agent.port, files, called_aet="CXRAUDIT")
        assert outcomes == dict.fromkeys(names, 0xC210), outcomes
        assert not list(agent.path("spool").rglob("*.dcm"))
        assert not agent.db_query("SELECT * FROM instances")
        kept = sorted(agent.path("quarantine").glob("*.bin"))
        assert len(kept) == 3
        reasons = [p.with_name(p.stem + ".reason.txt").read_text() for p in kept]
        assert all(r.startswith("reason: ") for r in reasons)
    finally:
        agent.stop()


# -- item 7: overwrite policy --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_overwrite_policy_under_a_known_sop_instance_uid(tmp_path: Path, policy: str) -> None:
    agent = AgentProcess(tmp_path, {"scp": {**TIMEOUTS, "overwrite": policy}})
    (first,) = make_study(1, accession="OVER01", size=64)
    (other,) = make_study(1, accession="OVER02", size=64)  # another study, same SOP UID
    other.SOPInstanceUID = first.SOPInstanceUID
    agent.start()
    try:
        assert store(agent.port, [first]) == [0]
        assert store(agent.port, [other]) == [0]
        (row,) = agent.db_query("SELECT * FROM instances")
        files = list(agent.path("spool").rglob("*.dcm"))
        assert [str(p) for p in files] == [row["path"]]
        kept = first if policy == "keep_first" else other
        assert row["study_instance_uid"] == kept.StudyInstanceUID
        outcome = "kept_first" if policy == "keep_first" else "replaced"
        assert f'cxr_agent_listener_events{{event="{outcome}"}} 1.0' in agent.metrics()
    finally:
        agent.stop()


# -- item 8: disk ------------------------------------------------------------------------------


def _spool_on(fs: Path) -> dict[str, str]:
    return {"spool": str(fs / "spool"), "quarantine": str(fs / "quarantine")}


def test_full_file_system_refuses_with_out_of_resources_and_keeps_what_it_acknowledged(
    tmp_path: Path,
) -> None:
    with small_filesystem(tmp_path / "fs", 24) as fs:
        agent = AgentProcess(tmp_path / "agent", {"scp": {**TIMEOUTS, "min_free_bytes": 0},
                                                  "paths": _spool_on(fs)})
        study = [_big_cxr(4 * MIB) for _ in range(8)]  # 32 MiB into 24 MiB
        agent.start()
        try:
            statuses = [store(agent.port, [ds])[0] for ds in study]
            assert 0 in statuses and 0xA700 in statuses, statuses
            first_refusal = statuses.index(0xA700)
            assert all(s == 0 for s in statuses[:first_refusal])
            rows = agent.db_query("SELECT path, sha256, size FROM instances")
            assert len(rows) == statuses.count(0)
            for row in rows:  # every acknowledged instance is whole on disk
                assert Path(row["path"]).stat().st_size == row["size"]
            assert not _temps(agent)
            assert echo(agent.port) == 0
        finally:
            agent.stop()


def test_concurrent_stores_reserve_space_and_never_cross_the_floor(tmp_path: Path) -> None:
    floor = 24 * MIB
    with small_filesystem(tmp_path / "fs", 64) as fs:
        agent = AgentProcess(tmp_path / "agent", {"scp": {**TIMEOUTS, "min_free_bytes": floor},
                                                  "paths": _spool_on(fs)})
        shares = [[_big_cxr(4 * MIB) for _ in range(3)] for _ in range(8)]  # 96 MiB offered
        results: list[list[int | None]] = [[] for _ in shares]
        agent.start()
        try:
            def send(n: int) -> None:
                results[n] = store(agent.port, shares[n])

            threads = [threading.Thread(target=send, args=(n,)) for n in range(len(shares))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            statuses = [s for r in results for s in r]
            assert set(statuses) <= {0, 0xA700} and 0xA700 in statuses, statuses
            free = shutil.disk_usage(fs).free
            assert free >= floor, f"free space {free} crossed the floor {floor}"
            assert not _temps(agent)
            metrics = agent.metrics()
            assert "cxr_agent_spool_reserved_bytes 0.0" in metrics  # every reservation released
            assert 'cxr_agent_listener_events{event="out_of_resources"}' in metrics
        finally:
            agent.stop()
    print(f"8 concurrent senders, 96 MiB into 64 MiB with a 24 MiB floor: "
          f"{statuses.count(0)} stored, {statuses.count(0xA700)} refused, {free} B left")


def test_restart_sweeps_temp_files_of_transfers_cut_by_sigkill(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, {"scp": TIMEOUTS})
    (victim,) = make_study(1, accession="SWEEP1", size=512)  # 512 KiB: many 8 KiB PDUs
    agent.start()
    try:
        stallers = [threading.Thread(target=_partial_store, args=(agent.port, victim),
                                     kwargs={"fragments": 8, "then": "stall"}) for _ in range(3)]
        for t in stallers:
            t.start()
        incoming = agent.path("spool") / INCOMING_DIR
        wait_until(lambda: len(list(incoming.glob("*.tmp"))) >= 3, timeout=30,
                   what="three transfers in flight", alive=agent.check_alive)
        agent.kill()
        left = len(list(incoming.glob("*.tmp")))
        assert left >= 3
        agent.start()
        assert not _temps(agent)
        assert f"{left} temp files removed" in agent.log_text()
        assert store(agent.port, [victim]) == [0]
        for t in stallers:
            t.join(30)
    finally:
        agent.stop()


def test_retention_clears_unpaired_studies_and_the_quarantine(tmp_path: Path) -> None:
    """Data that will never be audited does not stay for ever: a study waiting for a draft
    that never comes and a quarantined data set are removed after their retention."""
    days = 3.0 / 86_400  # three seconds
    agent = AgentProcess(tmp_path, {
        "scp": TIMEOUTS,
        "pairing": {"no_draft_policy": "wait", "draft_wait_seconds": 3600},
        "housekeeping": {"interval_seconds": 1, "unpaired_retention_days": days,
                         "quarantine_retention_days": days},
    })
    bad = next(m for m in corpus() if m.name == "rows_length_odd").write(tmp_path / "in")
    agent.start()
    try:
        assert store(agent.port, make_study(2, accession="NEVER1", size=64)) == [0, 0]
        assert send_raw("127.0.0.1", agent.port, [bad], called_aet="CXRAUDIT") == {
            bad.stem: 0xC210}
        assert list(agent.path("quarantine").glob("*.bin"))
        wait_until(lambda: agent.db_query(
            "SELECT state FROM studies WHERE state='waiting_draft'"), timeout=30,
            what="the study waiting for its draft", alive=agent.check_alive)
        wait_until(lambda: not list(agent.path("spool").rglob("*.dcm"))
                   and not list(agent.path("quarantine").iterdir()), timeout=60,
                   what="retention to clear the spool and the quarantine",
                   alive=agent.check_alive)
        assert not agent.db_query("SELECT * FROM instances")
        assert "housekeeping removed 2 spool files" in agent.log_text()
    finally:
        agent.stop()
