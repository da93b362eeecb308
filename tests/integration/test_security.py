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

import json
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.agentproc import (
    AGENT_AET,
    SENDER_AET,
    AgentProcess,
    echo,
    running_agent,
    store,
    storescu,
    wait_until,
)
from tests.builders import (
    SENTINEL_BIRTH_DATE,
    SENTINEL_PATIENT_ID,
    SENTINEL_PATIENT_NAME,
    make_cxr,
    save,
)
from tests.mutations import corpus, send_raw

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
