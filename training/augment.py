"""Resolution round trips: a 28×28 image made into a film of a random size, sampling method,
blur and gamma, then reduced exactly as serving reduces a decoded frame
(``preprocess.pipeline.reduce_for_preview`` + ``to_model_input`` with the model's own spec).

The model then learns from the tensors serving produces, not only from the data set's own
28×28 images. Copies are made once per data set and spec (cached under training/.cache)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from preprocess.pipeline import (
    DEFAULT_PREVIEW_MAX_SIZE,
    PreprocessSpec,
    reduce_for_preview,
    to_model_input,
)

CACHE = Path(__file__).resolve().parent / ".cache"
MIN_SIZE, MAX_SIZE = 64, 1024
NON_SQUARE_P = 0.4
MAX_ASPECT = 1.4
BLUR_P, BLUR_SIGMA = 0.3, (0.25, 0.7)  # sigma in pixels of the 28×28 image
GAMMA_P, GAMMA = 0.5, (0.8, 1.25)
METHODS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA)
BITS_STORED = 12


def save_cache(path: Path, array: np.ndarray) -> None:
    """Write atomically: a parallel run never loads a half-written file."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def round_trip(
    image_u8: np.ndarray,
    spec: PreprocessSpec,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    img = image_u8.astype(np.float32) / np.float32(255.0)
    if rng.random() < GAMMA_P:
        img = np.power(img, np.float32(rng.uniform(*GAMMA)))
    if rng.random() < BLUR_P:
        sigma = float(rng.uniform(*BLUR_SIGMA))
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)
    side = int(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE))))
    rows = cols = side
    if rng.random() < NON_SQUARE_P:
        longer = int(side * rng.uniform(1.05, MAX_ASPECT))
        rows, cols = (longer, side) if rng.random() < 0.5 else (side, longer)
    method = int(METHODS[rng.integers(len(METHODS))])
    if spec.crop == "center":
        # The content is the centred square; the rest of the film mirrors it (samples.py).
        big = cv2.resize(img, (side, side), interpolation=method)
        top, left = (rows - side) // 2, (cols - side) // 2
        big = cv2.copyMakeBorder(
            big, top, rows - side - top, left, cols - side - left, cv2.BORDER_REFLECT
        )
    else:
        # A whole-frame set (BreastMNIST): a non-square frame is a stretched image.
        big = cv2.resize(img, (cols, rows), interpolation=method)
    big = np.clip(big, 0.0, 1.0)
    if big.ndim == 2:  # a 12-bit grayscale film, as the radiograph builder stores it
        peak = (1 << BITS_STORED) - 1
        stored = (big * peak + 0.5).astype(np.uint16)
    else:  # an 8-bit colour photograph
        peak = 255
        stored = (big * peak + 0.5).astype(np.uint8)
    reduced = reduce_for_preview(stored, DEFAULT_PREVIEW_MAX_SIZE)
    return to_model_input(reduced.astype(np.float32) / np.float32(peak), spec, shape)


def copies(
    images: np.ndarray,
    spec: PreprocessSpec,
    shape: tuple[int, int, int],
    n_copies: int,
    seed: int,
) -> np.ndarray:
    """(N, n_copies, C, H, W) float32 round-trip copies, cached on disk by content."""
    key = hashlib.sha256(
        images.tobytes()
        + json.dumps([asdict(spec), shape, n_copies, seed, MIN_SIZE, MAX_SIZE]).encode()
    ).hexdigest()[:16]
    path = CACHE / f"augment-{key}.npy"
    if path.is_file():
        return np.load(path)
    rng = np.random.default_rng(seed)
    out = np.empty((len(images), n_copies, *shape), dtype=np.float32)
    for i, image in enumerate(images):
        for j in range(n_copies):
            out[i, j] = round_trip(image, spec, shape, rng)
    save_cache(path, out)
    return out
