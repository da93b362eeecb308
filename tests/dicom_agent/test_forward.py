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
from dicom_agent.errors import ForwardError
from dicom_agent.forward import backoff_seconds, drain_outbox, enqueue_forward, forward_files
from dicom_agent.state import JobKind, JobState, StateDB
from tests.conftest import free_port
from tests.dicom_agent.outputs.studies import written_findings
from tests.dicom_agent.storescp import Receiver

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

    def test_backoff_doubles_to_the_cap(self) -> None:
        forward = load_settings(forward={"retry_backoff_seconds": 5, "retry_backoff_max_seconds": 30}).forward
        assert [backoff_seconds(n, forward) for n in range(1, 6)] == [5, 10, 20, 30, 30]
