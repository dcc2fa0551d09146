"""Synthetic DICOM instances around real pixel data, for the demo, tests and benchmarks.

Headers are generated (fresh UIDs, a fake patient): no real patient data is involved.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from orchestrator.settings import REPO_ROOT

SAMPLES_FILE = REPO_ROOT / "samples" / "pneumoniamnist_test_16.npz"
# Radiograph-like encoding of an 8-bit image: 12 bits stored, upsampled.
BITS_STORED = 12
DEFAULT_SIZE = 512


def load_samples(path: Path = SAMPLES_FILE) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["images"], data["labels"].reshape(-1)


def radiograph(
    image_u8: np.ndarray,
    *,
    study_uid: str,
    series_uid: str | None = None,
    size: int | tuple[int, int] = DEFAULT_SIZE,
    instance_number: int = 1,
    priority: str | None = None,
    modality: str = "CR",
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0001",
    accession: str = "DEMO-ACC",
) -> bytes:
    """A CR instance (16-bit container, 12 bits stored) whose window maps back to the image."""
    rows, cols = (size, size) if isinstance(size, int) else size
    big = cv2.resize(image_u8, (cols, rows), interpolation=cv2.INTER_CUBIC)
    pixels = (big.astype(np.uint32) * ((1 << BITS_STORED) - 1) // 255).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    now = datetime.now()
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.InstanceNumber = instance_number
    if priority:
        ds.RequestedProcedurePriority = priority
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    # A full-range linear window: the windowed image equals the original 8-bit image.
    ds.WindowCenter = (1 << BITS_STORED) / 2
    ds.WindowWidth = 1 << BITS_STORED
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
