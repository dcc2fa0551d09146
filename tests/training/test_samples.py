"""The demo's DICOM builders for the three model sets: the tags the applicability rules read,
and pixel data that the pipeline turns back into the data set's own 28×28 image."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    OphthalmicPhotography8BitImageStorage,
    UltrasoundImageStorage,
)

from orchestrator import samples
from preprocess.pipeline import preprocess
from training import data

STUDY = "1.2.826.0.1.3680043.8.498.7"
# Grey levels (of 255) between the pipeline's tensor and the data set's image.
RMS_LIMIT = 10.0


def _rms(model: str, dicom: bytes, image: np.ndarray) -> float:
    spec, shape = data.model_spec(model)
    tensor = preprocess(pydicom.dcmread(BytesIO(dicom)), spec, shape).tensor
    grey = (tensor * spec.std + spec.mean) * 255.0
    ref = image.astype(np.float32)
    ref = ref[None] if ref.ndim == 2 else ref.transpose(2, 0, 1)
    return float(np.sqrt(np.mean((grey - ref) ** 2)))


@pytest.mark.parametrize("size", [512, (2500, 2048), (2048, 2500)], ids=str)
def test_radiograph_tags_and_centred_square(size: int | tuple[int, int]) -> None:
    image = data.load_raw("chest")["test"].images[3]
    dicom = samples.radiograph(image, study_uid=STUDY, size=size)
    ds = pydicom.dcmread(BytesIO(dicom))
    assert ds.SOPClassUID == ComputedRadiographyImageStorage
    assert (ds.Modality, ds.BodyPartExamined, ds.PatientAge, ds.ViewPosition) == (
        "CR",
        "CHEST",
        "003Y",
        "AP",
    )
    rows, cols = (size, size) if isinstance(size, int) else size
    assert (ds.Rows, ds.Columns) == (rows, cols)
    assert _rms("triage", dicom, image) < RMS_LIMIT


def test_radiograph_options() -> None:
    image = data.load_raw("chest")["test"].images[0]
    ds = pydicom.dcmread(
        BytesIO(
            samples.radiograph(
                image, study_uid=STUDY, patient_age="045Y", view_position="PA", size=256
            )
        )
    )
    assert (ds.PatientAge, ds.ViewPosition) == ("045Y", "PA")
    ds = pydicom.dcmread(
        BytesIO(samples.radiograph(image, study_uid=STUDY, patient_age=None, view_position=None))
    )
    assert "PatientAge" not in ds and "ViewPosition" not in ds


def test_ultrasound_builder() -> None:
    image = data.load_raw("breast")["test"].images[0]
    dicom = samples.ultrasound(image, study_uid=STUDY, size=(600, 800))
    ds = pydicom.dcmread(BytesIO(dicom))
    assert ds.SOPClassUID == UltrasoundImageStorage
    assert (ds.Modality, ds.BodyPartExamined, ds.PhotometricInterpretation) == (
        "US",
        "BREAST",
        "MONOCHROME2",
    )
    assert ds.pixel_array.shape == (600, 800)
    assert _rms("breast_us", dicom, image) < RMS_LIMIT


def test_fundus_builder() -> None:
    image = data.load_raw("retina")["test"].images[0]
    dicom = samples.fundus_photo(image, study_uid=STUDY, size=(1536, 2048))
    ds = pydicom.dcmread(BytesIO(dicom))
    assert ds.SOPClassUID == OphthalmicPhotography8BitImageStorage
    assert (ds.Modality, ds.BodyPartExamined, ds.PhotometricInterpretation) == ("OP", "EYE", "RGB")
    assert ds.pixel_array.shape == (1536, 2048, 3)
    assert _rms("fundus", dicom, image) < RMS_LIMIT
