"""The area downsampling: an exact k×k block step first where the sides allow it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from preprocess.pipeline import _block_factor, _shrink


@pytest.mark.parametrize(
    ("shape", "size", "k"),
    [
        ((2048, 2500), (419, 512), 4),  # the benchmark's radiograph: 512×625, then the target
        ((3000, 3000), (512, 512), 5),
        ((3520, 4280), (421, 512), 8),
        ((2047, 2500), (419, 512), 1),  # no common factor: one fractional step
        ((419, 512), (28, 28), 1),
        ((56, 56), (28, 28), 2),  # exact: the block step is the whole resize
        ((512, 512, 3), (256, 256), 2),
    ],
    ids=["2048x2500", "3000x3000", "3520x4280", "odd-rows", "preview-to-input", "exact", "rgb"],
)
def test_block_factor(shape: tuple[int, ...], size: tuple[int, int], k: int) -> None:
    assert _block_factor(shape, size) == k


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.float32])
def test_two_steps_match_one_area_resize(dtype: type) -> None:
    """A smooth 2048×2500 image: the two-step result is the one-step INTER_AREA result to within
    a fraction of a percent of the range, in the input's dtype and the requested size."""
    rows, cols = np.mgrid[0:2048, 0:2500].astype(np.float32)
    peak = 250.0 if dtype == np.uint8 else 4000.0
    smooth = peak * (0.5 + 0.25 * np.sin(rows / 97.0) + 0.25 * np.cos(cols / 131.0))
    arr = smooth.astype(dtype)
    out = _shrink(arr, (419, 512), cv2.INTER_AREA)
    direct = cv2.resize(arr, (512, 419), interpolation=cv2.INTER_AREA)
    assert out.shape == (419, 512) and out.dtype == arr.dtype
    diff = np.abs(out.astype(np.float64) - direct.astype(np.float64))
    assert diff.max() <= 0.005 * peak + 1
