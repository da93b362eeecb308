"""Synthetic test data: realistic-looking chest radiographs as DICOM datasets, and drafts.

Every dataset carries the sentinel patient identity below, so PHI-leak tests can grep for it.
Nothing here is real patient data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_agent.demo import chest_phantom  # the demo's synthetic chest: one drawing for both

SENTINEL_PATIENT_NAME = "SENTINEL^PHI^DONOTLOG"
SENTINEL_PATIENT_ID = "PHI-SENTINEL-4711"
SENTINEL_BIRTH_DATE = "19010203"

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
XA_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_cxr(
    *,
    rows: int = 512,
    cols: int = 512,
    bits_stored: int = 12,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    view_position: str = "PA",
    window: tuple[float, float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    accession: str = "ACC0001",
    patient_orientation: str | None = "A\\R",
    pixel_spacing: float | None = 0.143,
    body_part: str = "CHEST",
    seed: int = 0,
) -> Dataset:
    """A DX or CR chest radiograph with real-looking headers, ready to save or send."""
    sop_class = {"DX": DX_PRESENTATION, "CR": CR_STORAGE}[modality]
    arr = chest_phantom(rows, cols, bits_stored, seed)
    if photometric == "MONOCHROME1":
        arr = ((1 << bits_stored) - 1 - arr).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = SENTINEL_PATIENT_NAME
    ds.PatientID = SENTINEL_PATIENT_ID
    ds.PatientBirthDate = SENTINEL_BIRTH_DATE
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "SyntheticTest"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    if patient_orientation is not None:
        ds.PatientOrientation = patient_orientation
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageLaterality = "U"
        ds.DetectorType = "SCINTILLATOR"
        ds.BurnedInAnnotation = "NO"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.LossyImageCompression = "00"
        # PS3.3 C.8.11.1.1.1: INVERSE goes with MONOCHROME1, IDENTITY with MONOCHROME2
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
            "51185008",
            "SCT",
            "Chest",
        )
        ds.AnatomicRegionSequence = [region]
    if pixel_spacing is not None:
        ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_xa_run(
    *, frames: int = 8, rows: int = 128, cols: int = 128, peak_frame: int = 5, seed: int = 0
) -> Dataset:
    """A single-plane XA cine run: 8-bit MONOCHROME2 frames in which a contrast-filled (dark)
    vessel tree fills in, is fullest at ``peak_frame`` and washes out afterwards."""
    ds = make_cxr(rows=rows, cols=cols, bits_stored=8, modality="CR", seed=seed, pixel_spacing=None)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = XA_STORAGE
    ds.Modality = "XA"
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    vessels = (np.abs(y - rows // 2) < 3) | (np.abs(x - cols // 3) < 2) | (np.abs(x - y) < 2)
    stack = np.empty((frames, rows, cols), np.uint8)
    for k in range(frames):
        fill = max(0.0, 1.0 - abs(k - peak_frame) / max(peak_frame, frames - peak_frame, 1))
        frame = rng.normal(160, 4, (rows, cols))
        frame[vessels & (x < fill * cols)] = 40
        stack[k] = np.clip(frame, 0, 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 66.7
    ds.PixelData = stack.tobytes()
    return ds


def make_colour_sc(*, rows: int = 64, cols: int = 96, photometric: str = "RGB") -> Dataset:
    """A Secondary Capture with an RGB test pattern, stored as RGB, YBR_FULL or YBR_FULL_422.

    :func:`colour_pattern` gives the RGB truth; the YBR forms are encoded from it (PS3.3
    C.7.6.3.1.2), YBR_FULL_422 with Cb/Cr averaged over each horizontal pixel pair.
    """
    from pydicom.pixels import convert_color_space

    ds = make_cxr(rows=rows, cols=cols, bits_stored=8, modality="CR", pixel_spacing=None)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SC_STORAGE
    ds.Modality = "OT"
    rgb = colour_pattern(rows, cols)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PixelData = rgb.tobytes()
        return ds
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    if photometric == "YBR_FULL":
        ds.PixelData = ybr.tobytes()
        return ds
    if photometric != "YBR_FULL_422" or cols % 2:
        raise ValueError("photometric must be RGB, YBR_FULL or YBR_FULL_422 (even columns)")
    pairs = ybr.reshape(rows, cols // 2, 2, 3).astype(np.uint16)
    packed = np.empty((rows, cols // 2, 4), np.uint8)  # Y1 Y2 Cb Cr per pixel pair
    packed[..., 0], packed[..., 1] = pairs[:, :, 0, 0], pairs[:, :, 1, 0]
    packed[..., 2:] = ((pairs[:, :, 0, 1:] + pairs[:, :, 1, 1:] + 1) // 2).astype(np.uint8)
    ds.PixelData = packed.tobytes()
    return ds


def colour_pattern(rows: int, cols: int) -> np.ndarray:
    """A smooth RGB test pattern (uint8, rows x cols x 3), smooth enough for 4:2:2 chroma."""
    y, x = np.mgrid[0:rows, 0:cols]
    red = x * 255 // max(cols - 1, 1)
    green = y * 255 // max(rows - 1, 1)
    return np.stack([red, green, 255 - red], -1).astype(np.uint8)
