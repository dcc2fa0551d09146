"""PneumoniaMNIST from the team's shared data (MedMNIST v2, CC BY 4.0)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("MEDTRIAGE_DATA", str(REPO_ROOT.parent / "shared" / "data")))
# Train and calibrate on the reconstructed full split (official sizes and class balance)...
TRAIN_FILE = "medmnist/pneumoniamnist_reconstructed_full.npz"
# ...and report on this copy's test split, the one to compare with the paper.
TEST_FILE = "medmnist/pneumoniamnist_varun19424.npz"
# The serving pipeline's normalisation (model_repository/*/preprocess.json): (x/255 - 0.5)/0.5.
MEAN = 0.5
STD = 0.5


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, 1, 28, 28), normalised
    y: np.ndarray  # int64 (N,)


def normalise(images_u8: np.ndarray) -> np.ndarray:
    x = images_u8.astype(np.float32) / 255.0
    return ((x - MEAN) / STD)[:, None, :, :].astype(np.float32)


def _split(path: Path, name: str) -> Split:
    data = np.load(path)
    return Split(
        normalise(data[f"{name}_images"]), data[f"{name}_labels"].reshape(-1).astype(np.int64)
    )


def load(root: Path = DATA_ROOT) -> dict[str, Split]:
    return {
        "train": _split(root / TRAIN_FILE, "train"),
        "val": _split(root / TRAIN_FILE, "val"),
        "test": _split(root / TEST_FILE, "test"),
    }
