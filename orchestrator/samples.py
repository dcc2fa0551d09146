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
    UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    OphthalmicPhotography8BitImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from orchestrator.settings import data_dir

SAMPLES_FILE = data_dir("samples") / "pneumoniamnist_test_16.npz"
# The other model sets' demo images (samples/README.md says where they come from).
BREAST_SAMPLES_FILE = data_dir("samples") / "breastmnist_test_8.npz"
FUNDUS_SAMPLES_FILE = data_dir("samples") / "retinamnist_test_8.npz"
# Radiograph-like encoding of an 8-bit image: 12 bits stored, upsampled.
BITS_STORED = 12
DEFAULT_SIZE = 512
# 8-bit value → 12-bit stored value (v · 4095 // 255), as a lookup table (fast on large films).
_TO_12_BITS = (np.arange(256, dtype=np.uint32) * ((1 << BITS_STORED) - 1) // 255).astype(np.uint16)


def load_samples(path: Path = SAMPLES_FILE) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["images"], data["labels"].reshape(-1)


def _mirror_film(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``image`` up-sampled (cubic) to the centred square of the short edge, the rest of the
    ``rows`` × ``cols`` film filled by mirroring its edges outward: a centre crop to the short
    edge gives the square back, as MedMNIST's sets were cut from non-square sources."""
    side = min(rows, cols)
    big = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
    top, left = (rows - side) // 2, (cols - side) // 2
    if (rows, cols) == (side, side):
        return np.asarray(big)
    return np.asarray(
        cv2.copyMakeBorder(
            big, top, rows - side - top, left, cols - side - left, cv2.BORDER_REFLECT
        )
    )


def _dataset(
    sop_class: str,
    *,
    study_uid: str,
    series_uid: str | None,
    modality: str,
    body_part: str,
    instance_number: int,
    priority: str | None,
    patient_name: str,
    patient_id: str,
    accession: str,
    patient_age: str | None,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
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
    ds.BodyPartExamined = body_part
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if patient_age:
        ds.PatientAge = patient_age
    ds.AccessionNumber = accession
    ds.InstanceNumber = instance_number
    if priority:
        ds.RequestedProcedurePriority = priority
    return ds


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixel_module(
    ds: Dataset,
    pixels: np.ndarray,
    *,
    photometric: str,
    bits_stored: int,
    window: tuple[float, float] | None = None,
) -> None:
    """The Image Pixel module for unsigned ``pixels`` ((rows, cols) gray or (rows, cols, 3)
    colour, interleaved), in a container of 8 or 16 bits; ``window`` is (centre, width)."""
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
    patient_age: str | None = "003Y",
    view_position: str | None = "AP",
    body_part: str = "CHEST",
) -> bytes:
    """A CR instance (16-bit container, 12 bits stored) whose window maps back to the image.

    ``size`` is an int (square) or (rows, cols); a non-square film keeps the image as its
    centred square and mirrors the edges outward."""
    rows, cols = _shape(size)
    big = _mirror_film(image_u8, rows, cols)
    pixels = _TO_12_BITS[big]
    ds = _dataset(
        ComputedRadiographyImageStorage,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=modality,
        body_part=body_part,
        instance_number=instance_number,
        priority=priority,
        patient_name=patient_name,
        patient_id=patient_id,
        accession=accession,
        patient_age=patient_age,
    )
    if view_position:
        ds.ViewPosition = view_position
    # A full-range linear window: the windowed image equals the original 8-bit image.
    window = ((1 << BITS_STORED) / 2, 1 << BITS_STORED)
    _pixel_module(ds, pixels, photometric="MONOCHROME2", bits_stored=BITS_STORED, window=window)
    return _encode(ds)


def ultrasound(
    image_u8: np.ndarray,
    *,
    study_uid: str,
    series_uid: str | None = None,
    size: int | tuple[int, int] = DEFAULT_SIZE,
    instance_number: int = 1,
    priority: str | None = None,
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0002",
    accession: str = "DEMO-ACC-US",
    patient_age: str | None = "052Y",
) -> bytes:
    """A breast ultrasound instance (Ultrasound Image Storage, US, 8-bit MONOCHROME2); the
    28×28 image up-sampled (cubic) to the whole frame, as BreastMNIST resized without a crop."""
    rows, cols = _shape(size)
    pixels = np.asarray(cv2.resize(image_u8, (cols, rows), interpolation=cv2.INTER_CUBIC))
    ds = _dataset(
        UltrasoundImageStorage,
        study_uid=study_uid,
        series_uid=series_uid,
        modality="US",
        body_part="BREAST",
        instance_number=instance_number,
        priority=priority,
        patient_name=patient_name,
        patient_id=patient_id,
        accession=accession,
        patient_age=patient_age,
    )
    # The identity window ((x - 127.5) / 255 + 0.5 = x / 255): displayed as stored.
    _pixel_module(
        ds, pixels.astype(np.uint8), photometric="MONOCHROME2", bits_stored=8, window=(128, 256)
    )
    return _encode(ds)


def fundus_photo(
    image_rgb_u8: np.ndarray,
    *,
    study_uid: str,
    series_uid: str | None = None,
    size: int | tuple[int, int] = DEFAULT_SIZE,
    instance_number: int = 1,
    priority: str | None = None,
    patient_name: str = "DEMO^PATIENT",
    patient_id: str = "DEMO-0003",
    accession: str = "DEMO-ACC-OP",
    patient_age: str | None = "061Y",
    laterality: str = "R",
) -> bytes:
    """A retinal fundus photograph (Ophthalmic Photography 8 Bit Image Storage, OP, RGB); a
    non-square ``size`` keeps the image as its centred square, edges mirrored outward."""
    rows, cols = _shape(size)
    pixels = _mirror_film(image_rgb_u8, rows, cols).astype(np.uint8)
    ds = _dataset(
        OphthalmicPhotography8BitImageStorage,
        study_uid=study_uid,
        series_uid=series_uid,
        modality="OP",
        body_part="EYE",
        instance_number=instance_number,
        priority=priority,
        patient_name=patient_name,
        patient_id=patient_id,
        accession=accession,
        patient_age=patient_age,
    )
    ds.ImageLaterality = laterality
    _pixel_module(ds, pixels, photometric="RGB", bits_stored=8)
    return _encode(ds)
