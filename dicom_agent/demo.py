"""The whole loop in about two minutes, on any laptop, with no model: ``cxr-agent demo``.

:func:`run_demo` starts a real agent (``cxr-agent serve`` in a child process) in a folder of
its own (``var/demo`` by default), on free loopback ports, with the deterministic stand-in
grounder (profile ``fake``: every output names it "stand-in, not a model"). It generates a
handful of synthetic chest radiographs (drawn here, no patient ever existed), drops the drafts
first, sends the images through one real C-STORE association (PS3.4 Annex B, PS3.7 9.1.1),
waits for every audit and links each study's results under ``results/<ACCESSION>/``.

The stand-in answers by brightness (:mod:`cxr_auditor.grounding.fake`): a bright image shows a
pneumothorax on the patient's left and a pleural effusion on the patient's right (on a PA view
with Patient Orientation ``L\\F``), a dark one shows nothing. The cases below pair those images
with drafts chosen to raise every kind of flag.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_agent import conformance as dc
from dicom_agent.errors import AgentError
from dicom_agent.files import atomic_write_text
from dicom_agent.ports import free_loopback_port

#: Written into a demo folder; only a folder holding it is ever cleared by the next demo.
MARKER = ".cxr-agent-demo"
DEMO_AET = "CXRDEMO"
AGENT_AET = "CXRAUDIT"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # PS3.4 B.5: Digital X-Ray Image Storage
#: Timeouts of the demo's own association (seconds): every socket has one.
NETWORK_TIMEOUT = 30.0
#: What the window of a "dark" image is: everything but bone maps to black.
DARK_WINDOW = (3000.0, 1000.0)


@dataclass(frozen=True)
class DemoCase:
    """One synthetic study: its images, its draft (None: no draft arrives) and what it shows."""

    accession: str
    bright: bool
    draft: str | None
    shows: str
    lateral: bool = False


CASES = (
    DemoCase("DEMO-001", True, "Small left pleural effusion. No pneumothorax.",
             "LATERALITY (draft: left effusion, image: right), MISSING and URGENT pneumothorax"
             " (the draft denies one the image shows); its lateral view is not audited",
             lateral=True),
    DemoCase("DEMO-002", False, "Right upper lobe nodule. Mild cardiomegaly.",
             "UNSUPPORTED nodule and cardiomegaly (in the draft, not on the image)"),
    DemoCase("DEMO-003", True, "Right pleural effusion. Left pneumothorax.",
             "draft and image agree; the pneumothorax is still flagged URGENT"),
    DemoCase("DEMO-004", True, None,
             "no draft arrives: an image-only audit after pairing.draft_wait_seconds"),
)


# -- synthetic images ------------------------------------------------------------------------


def chest_phantom(rows: int, cols: int, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A chest-like picture in stored values (higher = more attenuation, MONOCHROME2 sense):
    soft tissue, two dark lungs, heart, spine, ribs, collimation and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    yn, xn = y / rows, x / cols
    img = np.full((rows, cols), 0.55, np.float32)  # soft tissue
    for cx in (0.32, 0.68):  # lungs: dark
        lung = ((xn - cx) / 0.17) ** 2 + ((yn - 0.48) / 0.33) ** 2 < 1
        img[lung] = 0.18
    heart = ((xn - 0.55) / 0.14) ** 2 + ((yn - 0.62) / 0.13) ** 2 < 1
    img[heart] = 0.6
    spine = np.abs(xn - 0.5) < 0.035
    img[spine] = 0.8
    for k in range(8):  # ribs
        band = np.abs(yn - (0.22 + 0.07 * k) - 0.05 * np.abs(xn - 0.5)) < 0.008
        img[band] = np.maximum(img[band], 0.45)
    img[(yn > 0.95) | (xn < 0.03) | (xn > 0.97)] = 0.02  # collimation / air
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    maxv = (1 << bits) - 1
    return np.clip(img * maxv, 0, maxv).astype(np.uint16)


def synthetic_radiograph(
    case: DemoCase, study_uid: str, series_uid: str, *, view: str = "PA", number: int = 1, size: int = 512
) -> Dataset:
    """A DX For Presentation chest radiograph (PS3.3 A.26) of an invented patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = dc.IMPLEMENTATION_CLASS_UID
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName = f"DEMO^SYNTHETIC^{case.accession}"
    ds.PatientID = case.accession
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.AccessionNumber = case.accession
    ds.StudyDate, ds.StudyTime, ds.StudyID = time.strftime("%Y%m%d"), time.strftime("%H%M%S"), "1"
    ds.StudyDescription = "SYNTHETIC DEMO CHEST - NOT A PATIENT"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, number
    ds.Manufacturer = "cxr-audit-agent demo (synthetic)"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.PatientOrientation = "L\\F" if view == "PA" else "A\\F"  # PS3.3 C.7.6.1.1.1
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality, ds.DetectorType, ds.BurnedInAnnotation = "U", "SCINTILLATOR", "NO"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.PresentationLUTShape, ds.LossyImageCompression = "IDENTITY", "00"
    ds.ImagerPixelSpacing = [0.143 * 3000 / size] * 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if not case.bright:
        ds.WindowCenter, ds.WindowWidth = DARK_WINDOW
    ds.PixelData = chest_phantom(size, size, 12, seed=number).tobytes()
    return ds


def study_images(case: DemoCase) -> list[Dataset]:
    """The PA view of a case, and a lateral one when the case has it."""
    study_uid, series_uid = generate_uid(), generate_uid()
    images = [synthetic_radiograph(case, study_uid, series_uid)]
    if case.lateral:
        images.append(synthetic_radiograph(case, study_uid, series_uid, view="LL", number=2))
    return images


# -- the agent ------------------------------------------------------------------------------


def demo_config(folder: Path) -> dict[str, Any]:
    """The demo agent's settings: everything under ``folder``, free ports, short waits."""
    return {
        "scp": {"ae_title": AGENT_AET, "host": "127.0.0.1", "port": free_loopback_port(),
                "allowed_calling_aets": [DEMO_AET]},
        "paths": {name: str(folder / name) for name in ("spool", "drafts", "out", "quarantine")}
        | {"state": str(folder / "state" / "agent.sqlite3")},
        "pairing": {"settle_seconds": 1, "draft_wait_seconds": 4, "study_wait_seconds": 120,
                    "poll_seconds": 0.5},
        "drafts": {"stable_seconds": 0.5, "poll_seconds": 0.5},
        "grounding": {"profile": "fake"},
        "health": {"enabled": True, "host": "127.0.0.1", "port": free_loopback_port()},
        "logging": {"level": "INFO"},
    }


def prepare_folder(folder: Path) -> None:
    """Clear a previous demo's folder (only one the demo made: it holds :data:`MARKER`).

    Raises:
        AgentError: the folder is someone else's, or a demo agent still runs in it (it holds the
            state lock: ``demo --serve`` in another terminal).
    """
    from dicom_agent.agent import LOCK_FILE, StateLock

    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise AgentError(f"{folder} exists and was not made by `cxr-agent demo`: choose another --folder")
        if (folder / "state").is_dir():
            StateLock(folder / "state" / LOCK_FILE).release()  # ConfigError while an agent holds it
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by cxr-agent demo; cleared by the next one\n", encoding="utf-8")


class DemoAgent:
    """``cxr-agent serve`` in a child process, logging to ``<folder>/agent.log``."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.config = config
        self.config_path = folder / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.config["scp"]["port"])

    @property
    def browser_url(self) -> str:
        """The results browser (docs/browser.md) on the health port."""
        return f"http://127.0.0.1:{self.config['health']['port']}/"

    @property
    def health_url(self) -> str:
        return self.browser_url + "healthz"

    def start(self, timeout: float) -> None:
        """Start ``serve`` and wait until its health endpoint answers 200 (serving)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AGENT__")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_agent.cli", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C on the demo is handled here, not by the agent
            )
        wait_for(self._serving, timeout, "the agent to start", self.check_alive)

    def _serving(self) -> bool:
        import httpx

        try:
            return httpx.get(self.health_url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def check_alive(self) -> None:
        """Raise AgentError, with the end of its log, when the agent process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise AgentError(f"the demo agent exited; the end of {self.log_path}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM (a clean stop: the batch in hand is finished), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, alive: Callable[[], None]) -> None:
    """Poll ``predicate`` every 0.2 s; ``alive`` raises when the agent died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        alive()
        if time.monotonic() > deadline:
            raise AgentError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def send_images(port: int, images: list[Dataset]) -> None:
    """Send ``images`` over one C-STORE association to the agent; raise unless all succeed."""
    from pynetdicom import AE

    ae = AE(ae_title=DEMO_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NETWORK_TIMEOUT
    ae.connection_timeout = NETWORK_TIMEOUT
    ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AGENT_AET)
    if not assoc.is_established:
        raise AgentError(f"the agent refused the demo's association on port {port}")
    try:
        for ds in images:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0x0000:
                raise AgentError(f"C-STORE of a demo image answered {status!r}")
    finally:
        assoc.release()


# -- the run --------------------------------------------------------------------------------


@dataclass
class DemoStudy:
    case: DemoCase
    study_uid: str
    images: list[Path]
    result: dict[str, Any] | None = None
    results_dir: Path | None = None


def _finished(out: Path, study: DemoStudy) -> bool:
    """The study's audit is written (and, when it has a draft, compared with it)."""
    try:
        result = json.loads((out / study.study_uid / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if study.case.draft is not None and result.get("mode") != "full":
        return False
    study.result = result
    return True


def run_demo(
    folder: Path,
    *,
    timeout: float = 180.0,
    say: Callable[[str], None] = print,
    then: Callable[[DemoAgent, list[DemoStudy]], None] | None = None,
) -> list[DemoStudy]:
    """Run the whole demo in ``folder``; return each study with its result and results folder.

    ``then(agent, studies)`` runs after the audits, while the agent still serves (the command's
    ``--serve``: browse the results until Ctrl-C); the agent is stopped afterwards in any case.
    """
    prepare_folder(folder)
    config = demo_config(folder)
    agent = DemoAgent(folder, config)
    say(f"starting the agent (stand-in grounder, not a model) in {folder} ...")
    agent.start(timeout=60.0)
    try:
        say(f"agent serving: DICOM 127.0.0.1:{agent.port} (AE {AGENT_AET}), health {agent.health_url}")
        studies = []
        for case in CASES:
            images = study_images(case)
            paths = []
            for n, ds in enumerate(images):
                path = folder / "images" / case.accession / f"{n + 1}-{ds.ViewPosition}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
            studies.append(DemoStudy(case, str(images[0].StudyInstanceUID), paths))
        drafts = Path(config["paths"]["drafts"])
        for study in studies:
            if study.case.draft is not None:
                atomic_write_text(drafts / f"{study.case.accession}.txt", study.case.draft + "\n")
        say(f"dropped {sum(s.case.draft is not None for s in studies)} drafts into {drafts}")
        from pydicom import dcmread

        from dicom_agent.outputs.layout import version_dir

        images = [dcmread(p) for s in studies for p in s.images]
        send_images(agent.port, images)
        say(f"sent {len(images)} synthetic radiographs of {len(studies)} studies over one C-STORE association")
        out = Path(config["paths"]["out"])
        for study in studies:
            wait_for(lambda s=study: _finished(out, s), timeout, f"the audit of {study.case.accession}",  # type: ignore[misc]
                     agent.check_alive)
            assert study.result is not None  # _finished read it: the latest version's sidecar
            link = folder / "results" / study.case.accession
            link.parent.mkdir(exist_ok=True)
            version = version_dir(Path("..") / "out" / study.study_uid, study.result["result_version"])
            link.symlink_to(version, target_is_directory=True)
            study.results_dir = link
            say(f"audited {study.case.accession}: {flag_summary(study.result)}")
        if then is not None:
            then(agent, studies)
    finally:
        agent.stop()
    return studies


def flag_summary(result: dict[str, Any] | None) -> str:
    """``MISSING pneumothorax, URGENT pneumothorax`` or ``no flags``."""
    flags = (result or {}).get("flags") or []
    return ", ".join(f"{f['kind'].upper()} {f['label'].replace('_', ' ')}" for f in flags) or "no flags"


def how_to_open(folder: Path, studies: list[DemoStudy]) -> list[str]:
    """The closing text: where each result is and a command that opens each kind of output."""
    first = studies[0].results_dir or folder / "results" / studies[0].case.accession
    lines = ["", "Results (research only; the grounder was a stand-in, not a model):"]
    for s in studies:
        lines.append(f"  {s.case.accession}: {s.results_dir}/  {flag_summary(s.result)}")
        lines.append(f"      shows: {s.case.shows}")
    rows = [
        ("the audit (JSON)", f"python3 -m json.tool {first}/audit.json"),
        ("the overlay picture", f"{first}/overlay-0.png in any image viewer (xdg-open, open)"),
        ("the structured report", f"dsrdump {first}/sr.dcm"),
        ("the GSPS and the SC", f"dcmdump {first}/gsps-0.dcm; dcmdump {first}/sc-0.dcm"),
        ("in a DICOM viewer", f"load {folder}/images/ together with {folder}/out/"),
        ("in the results browser", "bash scripts/run.sh demo --serve (the demo again, its agent kept up)"),
        ("the agent's log", f"{folder}/agent.log"),
    ]
    lines += ["", "Open them:"] + [f"  {what:<24}{how}" for what, how in rows]
    return lines

