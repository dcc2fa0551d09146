"""The pipeline path: images wrapped as DICOM by orchestrator/samples.py's builders at real
film sizes and put through ``preprocess.preprocess`` with the model's own spec — exactly what
serving feeds the model. Tensors are cached under training/.cache by content."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from io import BytesIO

import numpy as np
import pydicom

from orchestrator import samples
from preprocess.pipeline import PreprocessSpec, preprocess
from training.augment import CACHE, save_cache

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}" if size[0] != size[1] else str(size[0])


def dicom_bytes(builder: str, image: np.ndarray, size: tuple[int, int]) -> bytes:
    build = getattr(samples, builder)
    return bytes(build(image, study_uid=STUDY_UID, size=size))


def tensors(
    builder: str,
    images: np.ndarray,
    size: tuple[int, int],
    spec: PreprocessSpec,
    shape: tuple[int, int, int],
) -> np.ndarray:
    key = hashlib.sha256(
        images.tobytes() + json.dumps([builder, size, asdict(spec), shape]).encode()
    ).hexdigest()[:16]
    path = CACHE / f"pipeline-{key}.npy"
    if path.is_file():
        return np.load(path)
    out = np.stack(
        [
            preprocess(pydicom.dcmread(BytesIO(dicom_bytes(builder, im, size))), spec, shape).tensor
            for im in images
        ]
    )
    save_cache(path, out)
    return out
