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
    (0028,1056) VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID), else an automatic window.
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
    warnings.append("no_window_auto_used")
    low, high = auto_window(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32), warnings
