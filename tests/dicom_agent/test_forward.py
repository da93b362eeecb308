"""Forwarding results: C-STORE SCU to a local pynetdicom SCP, research-only rule, the outbox."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_agent.config import AgentSettings, Destination, TLSSettings, load_settings
from dicom_agent.errors import ForwardError, StateError
from dicom_agent.forward import (
    drain_outbox,
    enqueue_forward,
    forward_files,
    refused_for_good,
)
from dicom_agent.state import JobKind, JobRow, JobState, StateDB
from tests.conftest import free_port
from tests.support.builders import make_cxr, save
from tests.support.stalled_peer import FullBacklog, SilentPeer, StalledPeer, StallingProxy
from tests.support.storescp import Receiver
from tests.support.studies import written_findings

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    scp = Receiver(free_port()).start()
    yield scp
    scp.stop()


def _destination(port: int, research: bool = True) -> Destination:
    return Destination(
        name="research-pacs", ae_title="RESEARCHPACS", host="127.0.0.1", port=port, research=research
    )


def _drain_failing(tmp_path: Path, settings: AgentSettings, files: list[Path]) -> JobRow:
    """Queue ``files`` for the one destination and drain once, expecting nothing delivered."""
    db = StateDB(tmp_path / "state.sqlite3")
    (job_id,) = enqueue_forward(db, "1.2.3", files, settings.forward.destinations, now=0.0)
    assert drain_outbox(db, settings, now=0.0) == 0
    job = db.job(job_id)
    assert job is not None
    return job


@pytest.fixture
def result_files(tmp_path: Path, settings: AgentSettings) -> list[Path]:
    return written_findings(tmp_path, settings)[2]


class TestForwardFiles:
    def test_delivers_and_proposes_only_the_classes_sent(
        self, receiver: Receiver, result_files: list[Path]
    ) -> None:
        forward_files(_destination(receiver.port), result_files, calling_ae="CXRAUDIT")
        assert sorted(str(ds.SOPClassUID) for ds in receiver.received) == sorted(
            [SR_CLASS, GSPS_CLASS, SC_CLASS]
        )
        assert receiver.proposed == {(SR_CLASS, EXPLICIT_LE), (GSPS_CLASS, EXPLICIT_LE), (SC_CLASS, EXPLICIT_LE)}

    def test_non_research_destination_is_refused_with_a_log_line(
        self, receiver: Receiver, result_files: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dicom_agent.forward")
        with pytest.raises(ForwardError, match="not marked research"):
            forward_files(_destination(receiver.port, research=False), result_files, calling_ae="CXRAUDIT")
        assert receiver.received == []
        assert "not marked research" in caplog.text

    def test_unreachable_destination_raises_forward_error(self, result_files: list[Path]) -> None:
        with pytest.raises(ForwardError, match="association failed"):
            forward_files(_destination(free_port()), result_files, calling_ae="CXRAUDIT")

    def test_unreadable_file_is_translated_and_chained(self, tmp_path: Path, receiver: Receiver) -> None:
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(b"not dicom at all")
        with pytest.raises(ForwardError) as info:
            forward_files(_destination(receiver.port), [bad], calling_ae="CXRAUDIT")
        assert info.value.__cause__ is not None
        assert receiver.received == []


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (openssl CLI)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
class TestForwardTLS:
    def test_delivers_over_tls_and_refuses_an_unknown_ca(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        cert, key = _self_signed(tmp_path)
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)
        scp = Receiver(free_port()).start(ssl_context=server_context)
        try:
            trusted = _destination(scp.port).model_copy(
                update={"tls": TLSSettings(enabled=True, ca_file=cert)}
            )
            forward_files(trusted, result_files, calling_ae="CXRAUDIT")
            assert len(scp.received) == len(result_files)
            untrusted = _destination(scp.port).model_copy(update={"tls": TLSSettings(enabled=True)})
            with pytest.raises(ForwardError):
                forward_files(untrusted, result_files, calling_ae="CXRAUDIT")
            assert len(scp.received) == len(result_files)
        finally:
            scp.stop()


class TestOutbox:
    def _settings(self, tmp_path: Path, port: int, research: bool = True, **forward: object) -> AgentSettings:
        return load_settings(
            paths={"state": tmp_path / "state.sqlite3", "out": tmp_path / "out"},
            forward={
                "enabled": True,
                "destinations": [_destination(port, research).model_dump()],
                "retry_backoff_seconds": 30,
                "retry_backoff_max_seconds": 100,
                **forward,
            },
        )

    def test_retries_with_backoff_then_delivers_when_destination_returns(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        port = free_port()
        settings = self._settings(tmp_path, port)
        db = StateDB(tmp_path / "state.sqlite3")
        (job_id,) = enqueue_forward(db, "1.2.3", result_files, settings.forward.destinations, now=1000.0)

        assert drain_outbox(db, settings, now=1000.0) == 0  # nobody listening
        job = db.job(job_id)
        assert job is not None
        assert (job.state, job.attempts, job.next_attempt_at) == ("queued", 1, 1030.0)
        assert "association failed" in (job.last_error or "")

        assert drain_outbox(db, settings, now=1029.0) == 0  # not due yet: no attempt
        assert db.job(job_id).attempts == 1  # type: ignore[union-attr]
        assert drain_outbox(db, settings, now=1030.0) == 0
        assert db.job(job_id).next_attempt_at == 1030.0 + 60.0  # type: ignore[union-attr]
        assert drain_outbox(db, settings, now=1090.0) == 0
        assert db.job(job_id).next_attempt_at == 1090.0 + 100.0  # capped  # type: ignore[union-attr]

        scp = Receiver(port).start()
        try:
            assert drain_outbox(db, settings, now=1190.0) == 1
        finally:
            scp.stop()
        job = db.job(job_id)
        assert job is not None
        assert (job.state, job.attempts) == ("done", 4)
        assert len(scp.received) == len(result_files)
        assert db.jobs(JobState.QUEUED, JobKind.FORWARD) == []

    def test_job_is_dead_after_max_attempts_with_error_kept(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        settings = self._settings(tmp_path, free_port(), max_attempts=2)
        db = StateDB(tmp_path / "state.sqlite3")
        (job_id,) = enqueue_forward(db, "1.2.3", result_files, settings.forward.destinations, now=0.0)
        drain_outbox(db, settings, now=0.0)
        drain_outbox(db, settings, now=1000.0)
        job = db.job(job_id)
        assert job is not None
        assert (job.state, job.attempts) == ("dead", 2)
        assert "association" in (job.last_error or "")
        assert drain_outbox(db, settings, now=1e9) == 0

    def test_unexpected_error_releases_the_job_and_propagates(
        self, tmp_path: Path, result_files: list[Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def explode(*args: object, **kwargs: object) -> None:
            raise KeyError("bug")

        monkeypatch.setattr("dicom_agent.forward.forward_files", explode)
        settings = self._settings(tmp_path, free_port())
        db = StateDB(tmp_path / "state.sqlite3")
        (job_id,) = enqueue_forward(db, "1.2.3", result_files, settings.forward.destinations, now=0.0)
        with pytest.raises(KeyError):
            drain_outbox(db, settings, now=0.0)
        job = db.job(job_id)
        assert job is not None
        assert (job.state, job.attempts, job.last_error) == ("queued", 1, "unexpected KeyError")

    def test_non_research_destination_is_never_queued(
        self, tmp_path: Path, result_files: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="dicom_agent.forward")
        settings = self._settings(tmp_path, free_port(), research=False)
        db = StateDB(tmp_path / "state.sqlite3")
        assert enqueue_forward(db, "1.2.3", result_files, settings.forward.destinations) == []
        assert db.jobs(kind=JobKind.FORWARD) == []
        assert "research-pacs is not marked research" in caplog.text

    def test_payload_names_destination_and_files(self, tmp_path: Path, result_files: list[Path]) -> None:
        settings = self._settings(tmp_path, free_port())
        db = StateDB(tmp_path / "state.sqlite3")
        (job_id,) = enqueue_forward(db, "1.2.3", result_files, settings.forward.destinations)
        payload = json.loads(db.job(job_id).payload or "")  # type: ignore[union-attr]
        assert payload == {"destination": "research-pacs", "files": [str(p) for p in result_files]}


class TestFailureClasses:
    """Permanent refusals are dead at once; transient ones are retried (PS3.4 B.2.3)."""

    def _drain_once(self, tmp_path: Path, port: int, files: list[Path], ae: str = "RESEARCHPACS"):
        dest = _destination(port).model_copy(update={"ae_title": ae})
        settings = load_settings(
            paths={"state": tmp_path / "state.sqlite3", "out": tmp_path / "out"},
            forward={"enabled": True, "destinations": [dest.model_dump()], "max_attempts": 5},
        )
        return _drain_failing(tmp_path, settings, files)

    @pytest.mark.parametrize(("status", "state"), [(0xA900, "dead"), (0xC123, "dead"),
                                                   (0x0122, "dead"), (0xA700, "queued")])
    def test_status_decides_dead_or_retry(
        self, tmp_path: Path, result_files: list[Path], status: int, state: str
    ) -> None:
        scp = Receiver(free_port(), status=status).start()
        try:
            job = self._drain_once(tmp_path, scp.port, result_files)
        finally:
            scp.stop()
        assert (job.state, job.attempts) == (state, 1)
        assert f"0x{status:04X}" in (job.last_error or "")
        assert len(scp.received) == 1  # the first refusal ends the association

    def test_permanent_association_rejection_is_dead_at_once(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        scp = Receiver(free_port(), require_called_aet=True).start()
        try:
            job = self._drain_once(tmp_path, scp.port, result_files, ae="NOTTHEPACS")
        finally:
            scp.stop()
        assert (job.state, job.attempts) == ("dead", 1)
        assert "rejected (permanent)" in (job.last_error or "")

    def test_peer_refusing_every_presentation_context_is_dead_at_once(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        from pynetdicom import AE

        ae = AE(ae_title="RESEARCHPACS")
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification only: no storage class
        server = ae.start_server(("127.0.0.1", free_port()), block=False)
        try:
            job = self._drain_once(tmp_path, server.server_address[1], result_files)
        finally:
            server.shutdown()
        assert (job.state, job.attempts) == ("dead", 1)
        assert "refused every presentation context" in (job.last_error or "")

    def test_missing_result_file_is_dead_at_once(self, tmp_path: Path, receiver: Receiver) -> None:
        job = self._drain_once(tmp_path, receiver.port, [tmp_path / "gone.dcm"])
        assert (job.state, job.attempts) == ("dead", 1)
        assert receiver.received == []

    def test_is_refused_for_good_covers_the_permanent_ranges_only(self) -> None:
        assert all(refused_for_good(s) for s in (0x0122, 0xA900, 0xA9FF, 0xC000, 0xCFFF))
        assert not any(refused_for_good(s) for s in (0x0000, 0xA700, 0xA7FF, 0xB000, 0x0110))


@pytest.mark.timeout(120)  # without the timeouts these tests block for ever, not fail
class TestStalledPeers:
    """Real sockets that stall mid-PDU: the outbox returns and the job is retried later."""

    def _settings(self, tmp_path: Path, port: int, **forward: object) -> AgentSettings:
        return load_settings(
            paths={"state": tmp_path / "state.sqlite3", "out": tmp_path / "out"},
            forward={
                "enabled": True, "destinations": [_destination(port).model_dump()],
                "acse_timeout_seconds": 2, "dimse_timeout_seconds": 2,
                "network_timeout_seconds": 1, **forward,
            },
        )

    def test_peer_stalling_inside_the_association_answer(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        with StalledPeer() as peer:
            job = _drain_failing(tmp_path, self._settings(tmp_path, peer.port), result_files)
            assert peer.connections == 1
        assert (job.state, job.attempts) == ("queued", 1)
        assert "association failed" in (job.last_error or "")

    def test_peer_stalling_inside_the_c_store_response(
        self, tmp_path: Path, result_files: list[Path], receiver: Receiver
    ) -> None:
        with StallingProxy(receiver.port) as proxy:
            job = _drain_failing(tmp_path, self._settings(tmp_path, proxy.port), result_files)
            assert proxy.stalled.is_set()
        assert (job.state, job.attempts) == ("queued", 1)
        assert "no response" in (job.last_error or "")
        assert len(receiver.received) == 1  # the data set went through; its answer did not

    def test_watchdog_cuts_a_job_the_socket_timeouts_do_not_end(
        self, tmp_path: Path, result_files: list[Path], receiver: Receiver
    ) -> None:
        with StallingProxy(receiver.port) as proxy:
            settings = self._settings(
                tmp_path, proxy.port, acse_timeout_seconds=600, dimse_timeout_seconds=600,
                network_timeout_seconds=600, job_timeout_seconds=1,
            )
            job = _drain_failing(tmp_path, settings, result_files)
        assert (job.state, job.attempts) == ("queued", 1)
        assert "forward.job_timeout_seconds" in (job.last_error or "")

    def test_peer_that_stops_reading_is_bounded(
        self, tmp_path: Path, receiver: Receiver
    ) -> None:
        """A 32 MiB object to a PACS that stopped reading: the send blocks once the socket
        buffers are full; the socket timeout ends it (the DIMSE timer alone would not: the
        association thread stays blocked in the send)."""
        big = make_cxr(rows=4096, cols=4096)
        path = save(big, tmp_path / "big.dcm")
        with StallingProxy(receiver.port, stall_at=None, deaf=True) as proxy:
            settings = self._settings(tmp_path, proxy.port, dimse_timeout_seconds=600)
            job = _drain_failing(tmp_path, settings, [path])
            assert proxy.stalled.is_set()
        assert (job.state, job.attempts) == ("queued", 1)
        assert receiver.received == []

    def test_connect_that_never_completes_is_bounded(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        """SYNs dropped by a full listen backlog: without ``connection_timeout`` pynetdicom's
        connect waits for the kernel's SYN retries (about two minutes)."""
        with FullBacklog() as peer:
            settings = self._settings(tmp_path, peer.port, connect_timeout_seconds=1,
                                      acse_timeout_seconds=600)
            job = _drain_failing(tmp_path, settings, result_files)
        assert (job.state, job.attempts) == ("queued", 1)
        assert "association failed" in (job.last_error or "")

    def test_tls_handshake_with_a_silent_peer_is_bounded(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        """The handshake runs inside pynetdicom's connect, under ``connection_timeout``."""
        with SilentPeer() as peer:
            settings = self._settings(tmp_path, peer.port, connect_timeout_seconds=1,
                                      acse_timeout_seconds=600, network_timeout_seconds=600)
            tls = settings.forward.destinations[0].model_copy(
                update={"tls": TLSSettings(enabled=True)})
            settings.forward.destinations[0] = tls
            job = _drain_failing(tmp_path, settings, result_files)
            assert peer.connections == 1
        assert (job.state, job.attempts) == ("queued", 1)
        assert "association failed" in (job.last_error or "")

    def test_down_destination_is_transient(self, tmp_path: Path, result_files: list[Path]) -> None:
        job = _drain_failing(tmp_path, self._settings(tmp_path, free_port()), result_files)
        assert (job.state, job.attempts) == ("queued", 1)


class TestRetryDead:
    def test_dead_jobs_come_back_with_a_fresh_budget_and_deliver(
        self, tmp_path: Path, result_files: list[Path]
    ) -> None:
        port = free_port()
        settings = TestOutbox()._settings(tmp_path, port, max_attempts=1)
        db = StateDB(tmp_path / "state.sqlite3")
        (job_id,) = enqueue_forward(db, "1.2.3", result_files, settings.forward.destinations, now=0.0)
        drain_outbox(db, settings, now=0.0)
        assert db.job(job_id).state == "dead"  # type: ignore[union-attr]
        with pytest.raises(StateError, match="not dead forward jobs: 99"):
            db.retry_dead_forward_jobs([job_id, 99], now=10.0)
        assert db.job(job_id).state == "dead"  # type: ignore[union-attr]  # all or nothing
        (again,) = db.retry_dead_forward_jobs([job_id], now=10.0)
        assert (again.state, again.attempts, again.next_attempt_at) == ("queued", 0, 10.0)
        scp = Receiver(port).start()
        try:
            assert drain_outbox(db, settings, now=10.0) == 1
        finally:
            scp.stop()
        assert len(scp.received) == len(result_files)
