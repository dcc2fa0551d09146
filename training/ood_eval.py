"""The images an out-of-distribution gate must flag, as this model's tensors: the other
MedMNIST sets through this model's preprocessing, real DICOM files of other modalities,
blank / constant / noise frames, and inverted or 90°-rotated in-distribution images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom

from preprocess.pipeline import PreprocessSpec, preprocess, to_model_input
from training import data, pipeline_path

DICOM_ROOT = data.DATA_ROOT / "dicom"
# Modalities each data set is made of: files of these are not "other modalities".
OWN_MODALITIES = {"chest": {"CR", "DX", "RG"}, "breast": {"US"}, "retina": {"OP", "XC"}}
# Objects with no image to speak of.
NOT_IMAGES = {"SEG", "SR", "RWV", ""}
SIZE = (512, 512)
OTHER_NAMES = {"chest": "pneumoniamnist", "breast": "breastmnist", "retina": "retinamnist"}


def dicom_files(dataset: str) -> list[Path]:
    rows = list(csv.DictReader((DICOM_ROOT / "manifest.tsv").open(), delimiter="\t"))
    own = OWN_MODALITIES[dataset]
    return [
        DICOM_ROOT / r["path"]
        for r in rows
        if r["read_status"] == "ok"
        and r["pixel_array"] == "ok"
        and r["modality"] not in own | NOT_IMAGES
    ]


def dicom_tensors(
    dataset: str, spec: PreprocessSpec, shape: tuple[int, int, int]
) -> tuple[np.ndarray, list[str]]:
    out, names = [], []
    for path in dicom_files(dataset):
        try:
            tensor = preprocess(pydicom.dcmread(path), spec, shape).tensor
        except Exception:  # noqa: BLE001 - a file the platform would refuse is not scored
            continue
        out.append(tensor)
        names.append(str(path.relative_to(DICOM_ROOT)))
    return np.stack(out), names


def blank_frames(spec: PreprocessSpec, shape: tuple[int, int, int]) -> np.ndarray:
    """Constant frames at 11 levels, 8 uniform-noise frames, 4 linear ramps (512×512)."""
    rng = np.random.default_rng(0)
    frames = [np.full(SIZE, v, np.float32) for v in np.linspace(0.0, 1.0, 11)]
    frames += [rng.random(SIZE, dtype=np.float32) for _ in range(8)]
    ramp = np.linspace(0.0, 1.0, SIZE[1], dtype=np.float32)[None].repeat(SIZE[0], 0)
    frames += [ramp, ramp.T.copy(), 1 - ramp, 1 - ramp.T]
    if spec.color == "rgb":
        frames = [np.repeat(f[:, :, None], 3, axis=2) for f in frames]
    return np.stack([to_model_input(f, spec, shape) for f in frames])


def sets(model: str, test_images: np.ndarray) -> dict[str, np.ndarray]:
    """name → tensors, every set one the gate should flag."""
    spec, shape = data.model_spec(model)
    own = data.dataset_of(model)
    out: dict[str, np.ndarray] = {}
    for other in data.DATASETS.values():
        if other.name == own.name:
            continue
        images = data.load_raw(other.name)["test"].images
        out[f"{OTHER_NAMES[other.name]}_test"] = pipeline_path.tensors(
            other.builder, images, SIZE, spec, shape
        )
    out["dicom_other_modalities"], _ = dicom_tensors(own.name, spec, shape)
    out["blank_constant_noise"] = blank_frames(spec, shape)
    out["inverted"] = pipeline_path.tensors(own.builder, 255 - test_images, SIZE, spec, shape)
    rotated = np.ascontiguousarray(np.rot90(test_images, 1, axes=(1, 2)))
    out["rotated_90"] = pipeline_path.tensors(own.builder, rotated, SIZE, spec, shape)
    return out
