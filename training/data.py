"""The MedMNIST sets from the team's shared data (MedMNIST v2, CC BY 4.0), and the model
tensors each model sees: direct (the 28×28 image normalised) or through the DICOM pipeline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.pipeline import PreprocessSpec, to_model_input

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("MEDTRIAGE_DATA", str(REPO_ROOT.parent / "shared" / "data")))
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


@dataclass(frozen=True)
class DataSet:
    name: str
    labels: tuple[str, ...]
    train_file: str  # train and val splits
    test_file: str  # test split
    # Which DICOM builder of orchestrator/samples.py wraps an image of this set.
    builder: str
    # Typical film sizes (rows, cols) the pipeline path is measured at; val uses the first 3.
    sizes: tuple[tuple[int, int], ...]


DATASETS: dict[str, DataSet] = {
    "chest": DataSet(
        "chest",
        ("normal", "pneumonia"),
        # Train and calibrate on the reconstructed full split (official sizes, class balance)...
        "medmnist/pneumoniamnist_reconstructed_full.npz",
        # ...and report on this copy's test split, the one to compare with the paper.
        "medmnist/pneumoniamnist_varun19424.npz",
        "radiograph",
        ((512, 512), (1024, 1024), (2048, 2500), (2500, 2048)),
    ),
    "breast": DataSet(
        "breast",
        ("malignant", "benign_or_normal"),
        "medmnist/breastmnist.npz",
        "medmnist/breastmnist.npz",
        "ultrasound",
        ((512, 512), (1024, 1024), (600, 800), (768, 1024)),
    ),
    "retina": DataSet(
        "retina",
        ("grade_0", "grade_1", "grade_2", "grade_3", "grade_4"),
        "medmnist/retinamnist.npz",
        "medmnist/retinamnist.npz",
        "fundus_photo",
        ((512, 512), (1024, 1024), (1536, 2048), (2048, 1536)),
    ),
}
MODEL_DATASET = {"triage": "chest", "analysis": "chest", "breast_us": "breast", "fundus": "retina"}


@dataclass(frozen=True)
class Raw:
    images: np.ndarray  # uint8 (N, 28, 28) or (N, 28, 28, 3)
    y: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, C, 28, 28), normalised
    y: np.ndarray  # int64 (N,)


def dataset_of(model: str) -> DataSet:
    return DATASETS[MODEL_DATASET[model]]


def model_spec(model: str) -> tuple[PreprocessSpec, tuple[int, int, int]]:
    """The model's preprocess.json and its input shape (C, H, W)."""
    spec = PreprocessSpec.from_dict(
        json.loads((MODEL_REPOSITORY / model / "preprocess.json").read_text())
    )
    return spec, ((3 if spec.color == "rgb" else 1), 28, 28)


def load_raw(dataset: str, root: Path = DATA_ROOT) -> dict[str, Raw]:
    ds = DATASETS[dataset]
    out = {}
    for split, file in (("train", ds.train_file), ("val", ds.train_file), ("test", ds.test_file)):
        data = np.load(root / file)
        out[split] = Raw(
            data[f"{split}_images"], data[f"{split}_labels"].reshape(-1).astype(np.int64)
        )
    return out


def direct(images: np.ndarray, spec: PreprocessSpec, shape: tuple[int, int, int]) -> np.ndarray:
    """The 28×28 images as model tensors, through the serving pipeline's own function."""
    return np.stack(
        [to_model_input(im.astype(np.float32) / np.float32(255.0), spec, shape) for im in images]
    )


def load(model: str = "triage", root: Path = DATA_ROOT) -> dict[str, Split]:
    """Direct-path tensors for every split of the model's data set."""
    spec, shape = model_spec(model)
    return {
        k: Split(direct(v.images, spec, shape), v.y)
        for k, v in load_raw(MODEL_DATASET[model], root).items()
    }
