"""A real Orthanc for integration tests: private storage, free ports, stopped by PID.

``start_orthanc(folder)`` writes a configuration with its own storage and index folders, a DICOM
port and an HTTP port from :func:`tests.conftest.free_port`, an AE title and the declared
modalities, starts ``Orthanc <config.json>``, waits until both ports answer and returns an
:class:`OrthancServer` with small REST helpers (httpx). Use it from a fixture and call
``stop()`` in the finaliser::

    @pytest.fixture
    def orthanc(tmp_path):
        server = start_orthanc(tmp_path / "orthanc")
        yield server
        server.stop()

HTTP listens on loopback only (``RemoteAccessAllowed: false``). Orthanc 1.10 has no option to
bind its DICOM port to one address, so that port is a random free one that lives for one test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ORTHANC = shutil.which("Orthanc")
START_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Modality:
    """A peer Orthanc may send to or accept queries from (DicomModalities entry)."""

    ae_title: str
    host: str
    port: int


@dataclass
class OrthancServer:
    folder: Path
    ae_title: str
    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=10.0)

    # -- REST helpers --------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        """GET a REST resource and return its JSON."""
        response = self.client.get(path, params=params or None)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        response = self.client.post(path, content=body if isinstance(body, bytes | str) else json.dumps(body))
        response.raise_for_status()
        return response.json()

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc resources whose DICOM UID is ``uid`` (``/tools/lookup``)."""
        result: list[dict[str, Any]] = self.post("/tools/lookup", uid)
        return result

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The instances of a study, by Study Instance UID ([] when Orthanc has no such study)."""
        hits = [h for h in self.lookup(study_uid) if h["Type"] == "Study"]
        if not hits:
            return []
        instances: list[dict[str, Any]] = self.get(f"/studies/{hits[0]['ID']}/instances")
        return instances

    def tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags of an instance (keyword → value, sequences as lists of dicts)."""
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    # -- life cycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop Orthanc by PID: SIGTERM, then SIGKILL if it does not exit in 10 s."""
        self.client.close()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def log(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_config(
    folder: Path,
    *,
    ae_title: str,
    dicom_port: int,
    http_port: int,
    modalities: dict[str, Modality],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an Orthanc configuration whose storage and index live under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "Name": f"test-{ae_title}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomModalities": {
            name: [m.ae_title, m.host, m.port] for name, m in modalities.items()
        },
        "Plugins": [],
        "StableAge": 1,
        **(extra or {}),
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(
    folder: Path,
    *,
    ae_title: str = "ORTHANC",
    modalities: dict[str, Modality] | None = None,
    extra: dict[str, Any] | None = None,
    dicom_port: int | None = None,
) -> OrthancServer:
    """Start Orthanc with a private configuration under ``folder``; wait for both ports.

    ``dicom_port`` restarts an Orthanc on the port a stopped one had (a PACS that comes back).
    """
    if ORTHANC is None:
        raise RuntimeError("Orthanc is not installed")
    dicom_port, http_port = dicom_port or free_port(), free_port()
    config = write_config(
        folder,
        ae_title=ae_title,
        dicom_port=dicom_port,
        http_port=http_port,
        modalities=modalities or {},
        extra=extra,
    )
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    log.close()
    server = OrthancServer(folder, ae_title, dicom_port, http_port, process)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not (_port_open(http_port) and _port_open(dicom_port)):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"Orthanc did not start; its log:\n{server.log()[-2000:]}")
        time.sleep(0.05)  # polling a port, not waiting for a condition to happen by time
    return server
