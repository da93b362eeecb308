"""Tests for dicom_agent.scp: the Verification/Storage SCP over real loopback associations."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_agent import conformance as dc
from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.errors import ConfigError, StateError
from dicom_agent.ports import bind_tcp
from dicom_agent.scp import Listener, start_listener
from dicom_agent.spool import LOCKS_DIR
from dicom_agent.state import InstanceState, StateDB
from tests.conftest import free_port, var_paths
from tests.support.builders import (
    CT_STORAGE,
    SENTINEL_PATIENT_ID,
    SENTINEL_PATIENT_NAME,
    make_cxr,
)

VERIFICATION = dc.VERIFICATION_SOP_CLASS
OUR_AET = "CXRAUDIT"


# -- fixtures and helpers -------------------------------------------------------------------


def _settings(tmp_path: Path, **scp: Any) -> AgentSettings:
    s = load_settings(
        paths=var_paths(tmp_path / "var"),
        scp={"port": free_port(), "min_free_bytes": 0, **scp},
    )
    s.ensure_folders()
    return s


class Harness:
    """A running listener with its settings and state DB."""

    def __init__(self, settings: AgentSettings, db: StateDB, listener: Listener) -> None:
        self.settings, self.db, self.listener = settings, db, listener

    @property
    def spool(self) -> Path:
        return self.settings.paths.spool

    def spool_files(self, pattern: str = "*") -> list[Path]:
        """Instance and temp files in the spool (the lock files are not data)."""
        return sorted(
            p
            for p in self.spool.rglob(pattern)
            if p.is_file() and LOCKS_DIR not in p.relative_to(self.spool).parts
        )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Start a listener with ``scp`` overrides (and start_listener keywords); stopped after."""
    running: list[Harness] = []

    def _start(*, free_space: Any = None, on_stored: Any = None, **scp: Any) -> Harness:
        settings = _settings(tmp_path / f"l{len(running)}", **scp)
        db = StateDB(settings.paths.state)
        listener = start_listener(settings, db, free_space=free_space, on_stored=on_stored)
        harness = Harness(settings, db, listener)
        running.append(harness)
        return harness

    yield _start
    for harness in running:
        harness.listener.stop()
        harness.db.close()


@pytest.fixture
def listener(start: Callable[..., Harness]) -> Harness:
    return start()


def _associate(
    port: int,
    contexts: list[tuple[str, str]],
    *,
    calling: str = "TESTSCU",
    called: str = OUR_AET,
    tls: tuple[ssl.SSLContext, str] | None = None,
    source: str = "127.0.0.1",
) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    return ae.associate(
        "127.0.0.1", port, ae_title=called, tls_args=tls, bind_address=(source, 0)
    )


def _store(port: int, datasets: list[Dataset], syntax: str = ExplicitVRLittleEndian) -> list[int]:
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    assoc = _associate(port, [(c, syntax) for c in classes])
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _echo(port: int) -> int:
    assoc = _associate(port, [(VERIFICATION, ImplicitVRLittleEndian)])
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _sent_bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set bytes pynetdicom's SCU puts on the wire for ``syntax``."""
    uid = UID(syntax)
    data = encode(ds, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    assert data is not None
    return data


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# -- Verification ---------------------------------------------------------------------------


class TestEcho:
    def test_echo_succeeds(self, listener: Harness) -> None:
        assert _echo(listener.listener.port) == dc.STATUS_SUCCESS

    def test_accepted_sockets_have_tcp_nodelay(self, listener: Harness) -> None:
        assoc = _associate(listener.listener.port, [(VERIFICATION, ImplicitVRLittleEndian)])
        try:
            _wait_until(lambda: bool(listener.listener.server.active_associations))
            (server_side,) = listener.listener.server.active_associations
            sock = server_side.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            assoc.release()


# -- Storage --------------------------------------------------------------------------------


class TestStore:
    @pytest.mark.parametrize(
        ("modality", "syntax"),
        [
            ("DX", ExplicitVRLittleEndian),
            ("CR", ImplicitVRLittleEndian),
            ("DX", DeflatedExplicitVRLittleEndian),
            ("CR", ExplicitVRBigEndian),
        ],
    )
    def test_instance_lands_on_disk_as_sent_with_its_row(
        self, start: Callable[..., Harness], modality: str, syntax: str
    ) -> None:
        stored: list[str] = []
        h = start(on_stored=stored.append)
        ds = make_cxr(rows=128, cols=128, modality=modality)
        ds.file_meta.TransferSyntaxUID = syntax  # pynetdicom picks the context by it
        assert _store(h.listener.port, [ds], syntax) == [dc.STATUS_SUCCESS]
        path = h.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert h.spool_files() == [path]
        assert path.read_bytes().endswith(_sent_bytes(ds, syntax))
        back = dcmread(path)
        assert back.file_meta.TransferSyntaxUID == syntax
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.SourceApplicationEntityTitle == "TESTSCU"
        assert back.PixelData == ds.PixelData
        row = h.db.instance(ds.SOPInstanceUID)
        assert row is not None
        assert (row.path, row.modality, row.state) == (str(path), modality, InstanceState.STORED)
        assert stored == [ds.StudyInstanceUID]

    def test_data_recv_handlers_still_see_the_streamed_pdus(
        self, start: Callable[..., Harness]
    ) -> None:
        # Middle fragments skip pynetdicom's PDU objects; a bound EVT_DATA_RECV handler must
        # still get every P-DATA-TF (the listener binds none, so the copy is skipped then).
        listener = start(max_pdu_bytes=16384)  # the sender cuts the data set to fit
        ds = make_cxr(rows=256, cols=256)
        seen: list[bytes] = []
        assoc = _associate(listener.listener.port, [(str(ds.SOPClassUID), ExplicitVRLittleEndian)])
        try:
            _wait_until(lambda: bool(listener.listener.server.active_associations))
            (server_side,) = listener.listener.server.active_associations
            server_side.bind(evt.EVT_DATA_RECV, lambda event: seen.append(bytes(event.data)))
            assert int(assoc.send_c_store(ds).Status) == dc.STATUS_SUCCESS
        finally:
            assoc.release()
        p_data = [pdu for pdu in seen if pdu[0] == 0x04]
        assert len(p_data) > 3  # command, first, middle and last data set fragments
        assert sum(len(pdu) - 6 for pdu in p_data) > len(_sent_bytes(ds))

    def test_identical_duplicate_succeeds_with_one_file(self, listener: Harness) -> None:
        ds = make_cxr(rows=64, cols=64)
        assert _store(listener.listener.port, [ds, ds]) == [0, 0]
        assert len(listener.spool_files()) == 1
        assert listener.listener.stats == {"new": 1, "duplicate": 1}

    @pytest.mark.parametrize("policy", ["keep_first", "replace"])
    def test_different_bytes_under_a_known_uid_follow_the_overwrite_policy(
        self, start: Callable[..., Harness], policy: str
    ) -> None:
        h = start(overwrite=policy)
        ds = make_cxr(rows=64, cols=64, seed=1)
        again = make_cxr(
            rows=64,
            cols=64,
            seed=2,
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID,
        )
        assert _store(h.listener.port, [ds, again]) == [0, 0]
        (path,) = h.spool_files()
        kept = again if policy == "replace" else ds
        assert path.read_bytes().endswith(_sent_bytes(kept))
        row = h.db.instance(ds.SOPInstanceUID)
        assert row is not None and row.path == str(path)
        second = "replaced" if policy == "replace" else "kept_first"
        assert h.listener.stats == {"new": 1, second: 1}

    def test_oversize_instance_is_refused_and_not_written(
        self, start: Callable[..., Harness]
    ) -> None:
        """Past the limit while it arrives: the association is aborted, nothing is kept, and
        the listener serves the next association."""
        h = start(max_instance_bytes=10_000, max_pdu_bytes=4096)
        big = make_cxr(rows=128, cols=128)  # 32 KiB of pixels: aborted after 3 PDUs
        assoc = _associate(h.listener.port, [(str(big.SOPClassUID), ExplicitVRLittleEndian)])
        assert assoc.is_established
        status = assoc.send_c_store(big)
        assert "Status" not in status  # no response: the association was aborted
        assoc.abort()  # our side may not have seen the A-ABORT yet
        assert h.spool_files() == []
        assert h.db.counts()["instances"] == {}
        assert h.listener.stats == {"too_large": 1}
        assert _store(h.listener.port, [make_cxr(rows=16, cols=16)]) == [0]

    def test_free_space_floor_answers_out_of_resources_then_recovers(
        self, start: Callable[..., Harness]
    ) -> None:
        free = {"bytes": 1_000}
        h = start(min_free_bytes=50_000_000, free_space=lambda _: free["bytes"])
        ds = make_cxr(rows=64, cols=64)
        assert _store(h.listener.port, [ds]) == [dc.STATUS_OUT_OF_RESOURCES]
        assert h.spool_files() == []
        free["bytes"] = 10**12
        assert _store(h.listener.port, [ds]) == [dc.STATUS_SUCCESS]
        assert len(h.spool_files("*.dcm")) == 1

    def test_state_failure_answers_out_of_resources(
        self, listener: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(**kwargs: Any) -> None:
            raise StateError("state commit failed: disk I/O error")

        monkeypatch.setattr(listener.db, "record_instance", broken)
        assert _store(listener.listener.port, [make_cxr(rows=32, cols=32)]) == [
            dc.STATUS_OUT_OF_RESOURCES
        ]
        monkeypatch.undo()
        assert _store(listener.listener.port, [make_cxr(rows=32, cols=32)]) == [0]

    def test_no_phi_in_logs(self, listener: Harness, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        ds = make_cxr(rows=32, cols=32, accession="ACC-SENTINEL-99")
        bad = make_cxr(rows=32, cols=32, accession="ACC-SENTINEL-99")
        del bad.StudyInstanceUID
        assert _store(listener.listener.port, [ds, bad]) == [0, dc.STATUS_CANNOT_UNDERSTAND]
        text = caplog.text
        assert "instance.stored" in text
        for secret in (SENTINEL_PATIENT_NAME, SENTINEL_PATIENT_ID, "ACC-SENTINEL-99"):
            assert secret not in text


class TestMalformed:
    @pytest.mark.parametrize(
        ("breakage", "reason"),
        [
            ("no_study", "StudyInstanceUID is missing"),
            ("bad_series", "SeriesInstanceUID is not a valid UID"),
        ],
    )
    def test_refused_quarantined_and_listener_keeps_serving(
        self, listener: Harness, breakage: str, reason: str
    ) -> None:
        ds = make_cxr(rows=32, cols=32)
        if breakage == "no_study":
            del ds.StudyInstanceUID
        else:
            ds.SeriesInstanceUID = "1.2.x.3"
        assert _store(listener.listener.port, [ds]) == [dc.STATUS_CANNOT_UNDERSTAND]
        assert listener.spool_files() == []
        quarantine = listener.settings.paths.quarantine
        (kept,) = quarantine.glob("*.bin")
        assert kept.read_bytes() == _sent_bytes(ds)
        (note,) = quarantine.glob("*.reason.txt")
        assert reason in note.read_text()
        assert _echo(listener.listener.port) == 0
        assert _store(listener.listener.port, [make_cxr(rows=32, cols=32)]) == [0]

    def test_command_and_dataset_uid_mismatch_is_refused(self, listener: Harness) -> None:
        ds = make_cxr(rows=32, cols=32)
        assoc = _associate(listener.listener.port, [(ds.SOPClassUID, ExplicitVRLittleEndian)])
        assert assoc.is_established
        # pynetdicom's SCU always copies the UIDs from the data set, so send the request by hand,
        # pausing the association reactor as Association.send_c_store does.
        assoc._reactor_checkpoint.clear()
        _wait_until(lambda: assoc._is_paused)
        try:
            req = _store_request(ds, affected_sop_instance="1.2.3.4")
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()
        assert rsp is not None and rsp.Status == dc.STATUS_DATASET_MISMATCH
        assert listener.spool_files() == []
        assert len(list(listener.settings.paths.quarantine.glob("*.reason.txt"))) == 1


def _store_request(ds: Dataset, affected_sop_instance: str | None = None) -> C_STORE:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = affected_sop_instance or ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(_sent_bytes(ds))
    return req


def _send_part_of_store(port: int, ds: Dataset, fraction: float) -> Association:
    """Open an association and send only the first ``fraction`` of a C-STORE's P-DATA PDUs."""
    assoc = _associate(port, [(ds.SOPClassUID, ExplicitVRLittleEndian)])
    assert assoc.is_established
    msg = C_STORE_RQ()
    msg.primitive_to_message(_store_request(ds))
    fragments = list(msg.encode_msg(assoc.accepted_contexts[0].context_id, 16_384))
    assert len(fragments) > 10
    for pdu in fragments[: int(len(fragments) * fraction)]:
        assoc.dul.send_pdu(pdu)
    return assoc


class TestAbort:
    def test_peer_abort_mid_transfer_leaves_nothing(self, listener: Harness) -> None:
        ds = make_cxr(rows=512, cols=512)
        assoc = _send_part_of_store(listener.listener.port, ds, fraction=0.5)
        assoc.abort()
        _wait_until(lambda: not listener.listener.server.active_associations)
        assert listener.spool_files() == []
        assert listener.db.instance(ds.SOPInstanceUID) is None
        assert _store(listener.listener.port, [ds]) == [0]
        assert len(listener.spool_files()) == 1


    def test_peer_that_stalls_is_dropped_and_leaves_nothing(
        self, start: Callable[..., Harness]
    ) -> None:
        h = start(network_timeout_seconds=0.5)
        ds = make_cxr(rows=512, cols=512)
        assoc = _send_part_of_store(h.listener.port, ds, fraction=0.1)
        _wait_until(lambda: not h.listener.server.active_associations)
        assert assoc.is_aborted or not assoc.is_established
        assert h.spool_files() == []
        assert h.db.instance(ds.SOPInstanceUID) is None


class TestHandlerBoundary:
    def test_unexpected_error_answers_c211_and_listener_keeps_serving(
        self, listener: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spool = listener.listener.store_context.spool

        def explode(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(spool, "commit", explode)
        assert _store(listener.listener.port, [make_cxr(rows=32, cols=32)]) == [
            dc.STATUS_PROCESSING_FAILURE
        ]
        monkeypatch.undo()
        assert _store(listener.listener.port, [make_cxr(rows=32, cols=32)]) == [0]

    def test_failing_on_stored_callback_does_not_change_the_status(
        self, start: Callable[..., Harness]
    ) -> None:
        def callback(study_uid: str) -> None:
            raise RuntimeError("scheduler down")

        h = start(on_stored=callback)
        assert _store(h.listener.port, [make_cxr(rows=32, cols=32)]) == [0]
        assert len(h.spool_files("*.dcm")) == 1


class TestAssociationPolicy:
    def test_wrong_called_ae_title_is_rejected(self, listener: Harness) -> None:
        assoc = _associate(
            listener.listener.port, [(VERIFICATION, ImplicitVRLittleEndian)], called="OTHER"
        )
        assert assoc.is_rejected

    def test_unknown_calling_ae_title_is_rejected(self, start: Callable[..., Harness]) -> None:
        h = start(allowed_calling_aets=["MODALITY1"])
        cx = [(VERIFICATION, ImplicitVRLittleEndian)]
        assert _associate(h.listener.port, cx, calling="INTRUDER").is_rejected
        allowed = _associate(h.listener.port, cx, calling="MODALITY1")
        assert allowed.is_established
        allowed.release()

    def test_one_address_cannot_hold_every_slot(self, start: Callable[..., Harness]) -> None:
        h = start(max_associations=4, max_associations_per_address=2)
        port, cx = h.listener.port, [(VERIFICATION, ImplicitVRLittleEndian)]
        held = [_associate(port, cx) for _ in range(2)]  # e.g. a modality trickling data
        try:
            assert all(a.is_established for a in held)
            third = _associate(port, cx)
            assert third.is_rejected
            rj = third.acceptor.primitive
            assert rj is not None
            # Rejected-transient, service-provider (presentation), local-limit-exceeded.
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
            other_host = _associate(port, cx, source="127.0.0.2")
            assert other_host.is_established
            assert int(other_host.send_c_echo().Status) == dc.STATUS_SUCCESS
            other_host.release()
        finally:
            for assoc in held:
                assoc.release()
        _wait_until(lambda: not h.listener.server.active_associations)
        again = _associate(port, cx)
        assert again.is_established  # the address's slots came back with the releases
        again.release()
        assert h.listener.server.counters.snapshot().get("per_address_limit") == 1

    def test_unknown_sop_class_rejected_by_default(
        self, listener: Harness, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="dicom_agent.scp")
        cx = [(CT_STORAGE, ExplicitVRLittleEndian), (VERIFICATION, ImplicitVRLittleEndian)]
        assoc = _associate(listener.listener.port, cx)
        assert assoc.is_established
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assoc.release()
        assert accepted == {VERIFICATION}
        # The refused classes at DEBUG only; INFO says how many (the list runs to kilobytes).
        info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert not any(CT_STORAGE in m for m in info)
        assert any(m.endswith("(1 SOP classes refused)") for m in info)
        assert any(f"presentation contexts rejected for {CT_STORAGE}" in m for m in debug)

    def test_unknown_sop_class_ignored_is_stored_but_never_audited(
        self, start: Callable[..., Harness]
    ) -> None:
        h = start(unknown_sop_class="ignore")
        ds = make_cxr(rows=32, cols=32)
        ds.SOPClassUID = CT_STORAGE
        ds.Modality = "CT"
        assert _store(h.listener.port, [ds]) == [0]
        row = h.db.instance(ds.SOPInstanceUID)
        assert row is not None and row.state == InstanceState.IGNORED

    def test_worker_processes_share_the_port_and_all_store(
        self, start: Callable[..., Harness]
    ) -> None:
        h = start(workers=2)
        assert h.listener.pool is not None
        (worker,) = h.listener.pool.processes
        assert worker.is_alive()
        datasets = [make_cxr(rows=64, cols=64, seed=i) for i in range(8)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(
                pool.map(lambda chunk: _store(h.listener.port, chunk), [datasets[i::4] for i in range(4)])
            )
        assert statuses == [[0, 0]] * 4
        for ds in datasets:
            row = h.db.instance(ds.SOPInstanceUID)
            assert row is not None and Path(row.path).is_file()
        h.listener.stop()
        assert not worker.is_alive()


# -- TLS ------------------------------------------------------------------------------------


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA with a server (127.0.0.1) and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    subj = "/CN=test-ca"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subj,
             "-keyout", d / "ca.key", "-out", d / "ca.pem")  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")  # fmt: skip
        _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem",
                 "-CAkey", d / "ca.key", "-CAcreateserial", "-days", "2",
                 "-extfile", d / "san.cnf", "-out", d / f"{name}.pem")  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


class TestTLS:
    def _client(self, pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_pem"]))
        if with_cert:
            ctx.load_cert_chain(str(pki["client_pem"]), str(pki["client_key"]))
        return ctx

    def _tls(self, pki: dict[str, Path], require_client_cert: bool) -> dict[str, Any]:
        return {
            "enabled": True,
            "cert_file": pki["server_pem"],
            "key_file": pki["server_key"],
            "ca_file": pki["ca_pem"],
            "require_client_cert": require_client_cert,
        }

    def test_client_certificate_is_required(
        self, start: Callable[..., Harness], pki: dict[str, Path]
    ) -> None:
        h = start(tls=self._tls(pki, require_client_cert=True))
        cx = [(VERIFICATION, ImplicitVRLittleEndian)]
        good = _associate(h.listener.port, cx, tls=(self._client(pki, True), "127.0.0.1"))
        assert good.is_established
        assert int(good.send_c_echo().Status) == 0
        good.release()
        bare = _associate(h.listener.port, cx, tls=(self._client(pki, False), "127.0.0.1"))
        assert not bare.is_established
        plain = _associate(h.listener.port, cx)
        assert not plain.is_established
        assert h.spool_files() == []

    def test_without_client_verification_a_bare_tls_client_stores(
        self, start: Callable[..., Harness], pki: dict[str, Path]
    ) -> None:
        h = start(tls=self._tls(pki, require_client_cert=False))
        ds = make_cxr(rows=32, cols=32)
        assoc = _associate(
            h.listener.port,
            [(ds.SOPClassUID, ExplicitVRLittleEndian)],
            tls=(self._client(pki, False), "127.0.0.1"),
        )
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        assert len(h.spool_files("*.dcm")) == 1

    def test_tls_enabled_without_certificate_is_a_config_error(
        self, tmp_path: Path
    ) -> None:
        settings = _settings(tmp_path, tls={"enabled": True})
        db = StateDB(settings.paths.state)
        with pytest.raises(ConfigError, match="cert_file and key_file"):
            start_listener(settings, db)


def test_the_listener_takes_over_a_socket_bound_before_state_work(tmp_path: Path) -> None:
    """serve binds the DICOM port before any state work and hands that very socket to the
    listener, so there is no moment in which another program could take the port."""
    settings = _settings(tmp_path)
    bound = bind_tcp(settings.scp.host, settings.scp.port)  # the bind serve does
    db = StateDB(settings.paths.state)
    listener = start_listener(settings, db, bound=bound)
    try:
        assert listener.server.socket is bound and listener.port == settings.scp.port
        assert _echo(listener.port) == 0x0000
    finally:
        listener.stop()
        db.close()
    assert bound.fileno() == -1  # closed with the listener


# -- robustness against pydicom's test-file collection ----------------------------------------

_CLEAR_STATUSES = {
    dc.STATUS_SUCCESS,
    dc.STATUS_REFUSED_TOO_LARGE,
    dc.STATUS_DATASET_MISMATCH,
    dc.STATUS_CANNOT_UNDERSTAND,
}


def _sendable(path: str) -> Dataset | None:
    try:
        ds = dcmread(path)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if not (ds.get("SOPClassUID") and ds.get("SOPInstanceUID") and syntax):
            return None
    except Exception:  # unreadable by pydicom itself: nothing a peer could send
        return None
    return ds


@pytest.mark.slow
def test_every_local_pydicom_test_file_is_stored_or_refused_clearly(
    start: Callable[..., Harness],
) -> None:
    from pydicom.data import get_testdata_files

    h = start(unknown_sop_class="ignore")
    outcomes: dict[int, int] = {}
    for path in get_testdata_files():
        ds = _sendable(path)
        if ds is None:
            continue
        syntax = str(ds.file_meta.TransferSyntaxUID)
        assoc = _associate(h.listener.port, [(str(ds.SOPClassUID), syntax)])
        if not assoc.is_established:
            continue
        try:
            if not assoc.accepted_contexts:
                continue  # not a storage class, or a syntax we do not accept: refused at once
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, AttributeError, TypeError):
                continue  # pynetdicom cannot encode it for sending
            status = int(rsp.Status)
        finally:
            assoc.release()
        assert status in _CLEAR_STATUSES, (Path(path).name, hex(status))
        outcomes[status] = outcomes.get(status, 0) + 1
        if status == dc.STATUS_SUCCESS:
            row = h.db.instance(str(ds.SOPInstanceUID).strip())
            assert row is not None and Path(row.path).is_file(), Path(path).name
    assert outcomes.get(dc.STATUS_SUCCESS, 0) > 50
    assert _echo(h.listener.port) == 0
