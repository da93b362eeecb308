"""dcmtk's echoscu and storescu against our listener: the bytes arrive exactly as sent."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_agent.config import AgentSettings, load_settings
from dicom_agent.scp import Listener, start_listener
from dicom_agent.state import StateDB
from tests.conftest import free_port, var_paths
from tests.support.builders import make_cxr, save
from tests.support.spooling import data_set_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("echoscu", "storescu", "dcmcjpls")),
        reason="dcmtk binaries not installed",
    ),
]

_DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[AgentSettings, StateDB, Listener]]:
    settings = load_settings(
        paths=var_paths(tmp_path / "var"),
        scp={"port": free_port(), "allowed_calling_aets": ["DCMTKSCU"]},
    )
    settings.ensure_folders()
    db = StateDB(settings.paths.state)
    listener = start_listener(settings, db)
    yield settings, db, listener
    listener.stop()
    db.close()


def _dcmtk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], env=_DCMTK_ENV, capture_output=True, text=True, timeout=60
    )


def test_echoscu(running: tuple[AgentSettings, StateDB, Listener]) -> None:
    _, _, listener = running
    ok = _dcmtk("echoscu", "-aet", "DCMTKSCU", "-aec", "CXRAUDIT", "127.0.0.1", listener.port)
    assert ok.returncode == 0, ok.stderr
    refused = _dcmtk("echoscu", "-aet", "STRANGER", "-aec", "CXRAUDIT", "127.0.0.1", listener.port)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr + refused.stdout


def test_storescu_uncompressed_and_jpeg_ls_arrive_byte_exact(
    running: tuple[AgentSettings, StateDB, Listener], tmp_path: Path
) -> None:
    _, db, listener = running
    plain = save(make_cxr(rows=256, cols=256, modality="CR"), tmp_path / "in" / "plain.dcm")
    jls = tmp_path / "in" / "jls.dcm"
    made = _dcmtk("dcmcjpls", "--encode-lossless", save(make_cxr(rows=256, cols=256, seed=3),
                  tmp_path / "src.dcm"), jls)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert data_set_of(jls)[0] == "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
    sent = _dcmtk(
        "storescu", "-aet", "DCMTKSCU", "-aec", "CXRAUDIT", "--propose-jls-lossless", "--required",
        "127.0.0.1", listener.port, plain, jls,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    for source in (plain, jls):
        syntax, data_set = data_set_of(source)
        sop_uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        row = db.instance(sop_uid)
        assert row is not None, source.name
        assert row.transfer_syntax_uid == syntax
        assert data_set_of(Path(row.path)) == (syntax, data_set)
    assert listener.stats == {"new": 2}
