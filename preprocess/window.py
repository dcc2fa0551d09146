"""Modality LUT, VOI (window / VOI LUT), automatic window, and MONOCHROME1 inversion.

All on an image already downsampled to preview size: the linear steps commute with area
resampling, so this equals windowing at full size up to clipping at the window's edges.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

# Robust automatic window when the image has none: these percentiles of the values.
AUTO_WINDOW_LOW_PCT = 0.5
AUTO_WINDOW_HIGH_PCT = 99.5
# Unsigned images of at most this many bits stored carry display values: with no window tags
# their full range is used (wider ones get the automatic window).
FULL_RANGE_MAX_BITS = 8


def _first(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """(0028,1052) RescaleIntercept, (0028,1053) RescaleSlope or (0028,3000) Modality LUT."""
    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except (TypeError, ValueError, IndexError, AttributeError, KeyError):
            pass  # a broken Modality LUT falls back to the rescale attributes
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out = arr.astype(np.float32, copy=False)
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    return out


def auto_window(values: np.ndarray) -> tuple[float, float]:
    """(low, high) from percentiles of a (small, already downsampled) image."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [AUTO_WINDOW_LOW_PCT, AUTO_WINDOW_HIGH_PCT])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def voi(values: np.ndarray, ds: Dataset, *, mode: str) -> tuple[np.ndarray, list[str]]:
    """Map modality values to [0, 1] display values.

    (0028,3010) VOI LUT Sequence, else (0028,1050) WindowCenter / (0028,1051) WindowWidth with
    (0028,1056) VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID), else for unsigned images of
    ≤ 8 bits (0028,0101) BitsStored their full range, else an automatic window.
    """
    warnings: list[str] = []
    if mode == "auto" and "VOILUTSequence" in ds:
        try:
            out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float32)
            lo, hi = float(out.min()), float(out.max())
            return (out - lo) / (hi - lo if hi > lo else 1.0), warnings
        except Exception:  # noqa: BLE001 - a broken LUT falls back to a window
            warnings.append("voi_lut_unusable")
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    if mode == "auto" and center is not None and width is not None:
        try:
            c, w = _first(center), _first(width)
        except (TypeError, ValueError, IndexError):
            c, w = 0.0, 0.0
        if w > 1:
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            if function == "SIGMOID":
                windowed = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
            elif function == "LINEAR_EXACT":
                windowed = (values - (c - w / 2)) / w
            else:  # PS3.3 C.11.2.1.2.1
                windowed = (values - (c - 0.5)) / (w - 1) + 0.5
            return np.clip(windowed, 0.0, 1.0).astype(np.float32), warnings
        warnings.append("window_invalid")
    bits = int(ds.get("BitsStored", 0) or 0)
    if bits and bits <= FULL_RANGE_MAX_BITS and not int(ds.get("PixelRepresentation", 0) or 0):
        # 8-bit grayscale (ultrasound, photographs, secondary captures) is already display
        # values: stretching it to percentiles moved a breast frame ~20 grey levels RMS away
        # from the data set's image. Its full range is its window.
        warnings.append("no_window_full_range")
        top = float((1 << bits) - 1)
        return np.clip(values / top, 0.0, 1.0).astype(np.float32), warnings
    warnings.append("no_window_auto_used")
    low, high = auto_window(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32), warnings
