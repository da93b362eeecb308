"""Security of the running agent: who may talk to it, over what, and what it leaves behind.

- AE titles: an unknown calling AE title and a wrong called AE title are rejected at
  association time (PS3.8 §7.1.1.8 / A-ASSOCIATE-RJ reasons 3 and 7).
- TLS (PS3.15 Annex B.1) with client-certificate verification, using a CA, server and client
  certificates made here with the ``openssl`` CLI: a client with a certificate signed by the
  CA works, a client without one (or speaking plain TCP) is refused.
- After a full run with hostile inputs (path-shaped UIDs, hostile draft names and JSON keys,
  forwarding on), every file under the temporary root is inside a configured folder, and no
  log line carries the sentinel patient name, ID, birth date or the accession number.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from tests.support.agentproc import (
    SENDER_AET,
    AgentProcess,
    echo,
    make_study,
    running_agent,
    store,
    storescu,
    wait_until,
)
from tests.support.builders import (
    SENTINEL_BIRTH_DATE,
    SENTINEL_PATIENT_ID,
    SENTINEL_PATIENT_NAME,
    make_cxr,
    save,
)
from tests.support.mutations import corpus, send_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# -- a throw-away PKI -----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA and two leaf certificates signed by it (EC P-256, valid 2 days), via openssl.

    Returns paths ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``,
    and ``rogue_cert``/``rogue_key``: a client certificate signed by a *different* CA.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=cxr-test-{ca}", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for leaf, ca, ext in (
        ("server", "ca", "server.ext"),
        ("client", "ca", "client.ext"),
        ("rogue", "rogue-ca", "client.ext"),
    ):
        _openssl("req", *ec, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr",
                 "-subj", f"/CN=cxr-test-{leaf}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{leaf}.pem", "-days", "2", "-extfile", ext,
                 cwd=folder)
    return {
        "ca": folder / "ca.pem",
        "server_cert": folder / "server.pem",
        "server_key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
        "rogue_cert": folder / "rogue.pem",
        "rogue_key": folder / "rogue.key",
    }


def client_context(pki: dict[str, Path], *, cert: str | None = "client") -> ssl.SSLContext:
    """A TLS client context trusting our CA, presenting ``<cert>.pem`` unless None."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert is not None:
        context.load_cert_chain(str(pki[f"{cert}_cert"]), str(pki[f"{cert}_key"]))
    return context


# -- AE titles ------------------------------------------------------------------------------------


def test_unknown_calling_and_wrong_called_ae_titles_are_rejected(tmp_path: Path) -> None:
    with running_agent(tmp_path, {"scp": {"allowed_calling_aets": [SENDER_AET]}}) as agent:
        assert echo(agent.port) == 0
        assert echo(agent.port, calling_aet="INTRUDER") is None
        assert echo(agent.port, called_aet="NOTTHEAGENT") is None
        # The refused peers stored nothing, and the listener keeps serving the allowed one.
        ds = make_cxr(rows=64, cols=64)
        assert store(agent.port, [ds], calling_aet="INTRUDER") == [None]
        assert not list(agent.path("spool").rglob("*.dcm"))
        assert store(agent.port, [ds]) == [0]
        log = agent.log_text()
    assert log.count("association rejected") >= 3, log


# -- TLS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_requires_a_client_certificate_from_our_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = {
        "enabled": True,
        "cert_file": str(pki["server_cert"]),
        "key_file": str(pki["server_key"]),
        "ca_file": str(pki["ca"]),
        "require_client_cert": True,
    }
    agent = AgentProcess(tmp_path, {"scp": {"tls": tls}})
    agent.start(wait=False)
    try:
        good = client_context(pki)
        wait_until(agent.healthz, timeout=60, what="agent health", alive=agent.check_alive)
        assert wait_until(lambda: echo(agent.port, tls=good) == 0, timeout=30,
                          what="TLS C-ECHO", alive=agent.check_alive)
        ds = make_cxr(rows=64, cols=64)
        assert store(agent.port, [ds], tls=good) == [0]
        assert agent.db_query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
        # No client certificate, a certificate from another CA, or no TLS at all: refused.
        assert echo(agent.port, tls=client_context(pki, cert=None)) is None
        assert echo(agent.port, tls=client_context(pki, cert="rogue")) is None
        assert echo(agent.port) is None
        # dcmtk as the TLS peer: with our client certificate it stores, anonymously it is refused.
        files = [save(make_cxr(rows=64, cols=64), tmp_path / f"{n}.dcm") for n in ("a", "b")]
        ca = ["+cf", str(pki["ca"])]
        with_cert = storescu(agent.port, files[:1],
                             extra=["+tls", str(pki["client_key"]), str(pki["client_cert"]), *ca])
        assert with_cert.returncode == 0, with_cert.stderr
        anonymous = storescu(agent.port, files[1:], extra=["+tla", *ca])
        assert anonymous.returncode != 0
        agent.check_alive()
        assert echo(agent.port, tls=good) == 0
        assert agent.db_query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 2
    finally:
        agent.stop()


# -- a full run with hostile inputs -------------------------------------------------------------

SENTINEL_ACCESSION = "ACCSENT4711"


class ReceivingSCP:
    """A research destination on loopback: a pynetdicom Storage SCP counting what arrives."""

    def __init__(self, ae_title: str = "RESEARCHPACS") -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.ae_title = ae_title
        self.received: list[str] = []
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)

        def on_store(event: object) -> int:
            self.received.append(str(event.request.AffectedSOPClassUID))  # type: ignore[attr-defined]
            return 0

        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert server is not None
        self._server = server
        self.port = int(server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()


def test_hostile_run_writes_only_inside_its_folders_and_logs_no_phi(tmp_path: Path) -> None:
    destination = ReceivingSCP()
    agent = AgentProcess(tmp_path / "agent", {
        "scp": {"unknown_sop_class": "ignore"},
        "forward": {
            "enabled": True,
            "retry_backoff_seconds": 0.2,
            "retry_backoff_max_seconds": 1,
            "destinations": [{"name": "research", "ae_title": destination.ae_title,
                              "host": "127.0.0.1", "port": destination.port,
                              "research": True}],
        },
    })
    studies = [make_study(2, accession=SENTINEL_ACCESSION, size=96),
               make_study(1, accession="ACCSENT4712", size=96)]
    agent.start()
    try:
        for study in studies:
            assert store(agent.port, study) == [0] * len(study)
        agent.drop_draft(f"{SENTINEL_ACCESSION}.txt", "Small right pneumothorax. No effusion.")
        agent.drop_draft(f"{studies[1][0].StudyInstanceUID}.txt", "Normal chest.")
        hostile = [m.write(tmp_path / "in") for m in corpus()]
        send_raw("127.0.0.1", agent.port, hostile, called_aet=agent.config["scp"]["ae_title"])
        (agent.path("drafts") / "x\\..\\..\\y.txt").write_text("escape attempt")
        (agent.path("drafts") / "traversal.json").write_text(
            '{"study_instance_uid": "../../../../tmp/owned", "text": "x"}')
        uids = [s[0].StudyInstanceUID for s in studies]
        wait_until(lambda: all(agent.result(u) for u in uids), timeout=90,
                   what="results", interval=0.5, alive=agent.check_alive)
        # A re-audit (version 2) through the CLI, and its forwarding.
        assert agent.cli("reaudit", uids[0]).returncode == 0
        wait_until(lambda: agent.versions(uids[0]) == [1, 2], timeout=60,
                   what="version 2", interval=0.5, alive=agent.check_alive)
        # Every study (the hostile ones too: image-only after the draft wait) is audited and
        # its results forwarded before the logs are read.
        wait_until(lambda: agent.db_query("SELECT 1 FROM studies WHERE state='audited'")
                   and not agent.db_query(
                       "SELECT study_instance_uid FROM jobs WHERE state NOT IN ('done', 'dead')"
                       " UNION SELECT study_instance_uid FROM studies"
                       " WHERE state NOT IN ('audited', 'failed')"),
                   timeout=90, what="every audit and forward", interval=0.5,
                   alive=agent.check_alive)
        status = agent.cli("status")
        wait_until(lambda: not any(agent.path("drafts").glob("*.*")), timeout=30,
                   what="drafts handled", alive=agent.check_alive)
    finally:
        agent.stop()
        destination.stop()
    assert destination.received, "nothing was forwarded"
    assert "1.2.840.10008.5.1.4.1.1.88.34" in destination.received  # Comprehensive 3D SR

    # Every file the agent wrote is inside one of its configured folders.
    folders = [agent.path(n).resolve() for n in ("spool", "drafts", "out", "quarantine", "state")]
    harness = {agent.config_path, agent.log_path}
    outside = [
        p for p in agent.files_under_root()
        if p not in harness and not any(p.resolve().is_relative_to(f) for f in folders)
    ]
    assert not outside, outside
    assert not Path("/tmp/owned").exists() and not Path("/tmp/cxr-owned").exists()

    # No identifying value in any log line (ingest, drafts, audit, SR, forward, CLI output).
    text = agent.log_text() + status.stdout + status.stderr
    for secret in (SENTINEL_PATIENT_NAME, "SENTINEL^PHI", SENTINEL_PATIENT_ID,
                   SENTINEL_BIRTH_DATE, SENTINEL_ACCESSION, "ACCSENT4712", "ACC9999999"):
        leaks = [line for line in text.splitlines() if secret in line]
        assert not leaks, f"{secret!r} in the log:\n" + "\n".join(leaks[:5])
