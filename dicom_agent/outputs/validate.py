"""Validation of every DICOM object before it leaves the agent.

At run time: encode with pydicom as a PS3.10 file, decode the bytes again and check the
identifying attributes survived; an SR is also re-read with highdicom's ``srread``, which
rebuilds the TID 1500 tree and fails on a structure it cannot interpret.

The external validators, dicom3tools ``dciodvfy`` (IOD conformance, PS3.3) and dcmtk
``dsrdump`` (SR tree rendering), are wrapped here too; the tests run them on every object they
produce. They are optional at run time because a site may not install them.
"""

from __future__ import annotations

import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from dicom_agent.errors import OutputError

_SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
}
_KEYS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def encode_validated(ds: Dataset) -> bytes:
    """PS3.10 bytes of ``ds`` after a write → read round trip; raises OutputError on failure."""
    buffer = BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise OutputError(f"object does not encode as a DICOM file: {exc}") from exc
    data = buffer.getvalue()
    try:
        back = pydicom.dcmread(BytesIO(data))
        for keyword in _KEYS:
            if str(back.get(keyword, "")) != str(ds.get(keyword, "")) or not back.get(keyword):
                raise OutputError(f"{keyword} missing or changed after the round trip")
        if back.SOPClassUID in _SR_SOP_CLASSES:
            report = hd.sr.srread(BytesIO(data)).content
            if not isinstance(report, hd.sr.MeasurementReport):
                raise OutputError("SR does not re-read as a TID 1500 Measurement Report")
            if not report.get_observer_contexts():
                raise OutputError("SR re-read without an observer context")
        elif "PixelData" in back:
            back.pixel_array  # noqa: B018 - decoding is the check
    except OutputError:
        raise
    except Exception as exc:  # any decoder failure means the file cannot be trusted
        raise OutputError(f"object does not decode after encoding: {type(exc).__name__}: {exc}") from exc
    return data


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) reports for ``path``; empty when clean."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise OutputError("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def dsrdump_tree(path: Path) -> str:
    """The SR tree as dcmtk ``dsrdump`` prints it; raises OutputError when it cannot parse."""
    exe = shutil.which("dsrdump")
    if exe is None:
        raise OutputError("dsrdump (dcmtk) is not installed")
    proc = subprocess.run(
        [exe, "--print-long-values", "--print-instance-uid", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0 or "<CONTAINER" not in proc.stdout:
        raise OutputError(f"dsrdump could not render the SR (exit {proc.returncode})")
    return proc.stdout
