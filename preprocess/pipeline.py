"""DICOM dataset → model tensor + JPEG preview.

decode one frame → downsample to preview size (integer or float32, INTER_AREA) → modality
LUT → VOI window → MONOCHROME1 inversion → colour → preview JPEG; then resize to the model
input, normalise. Full-size float work and full-size sorts are avoided: a 2048×2500 16-bit
radiograph is reduced to ≤512 px before any float conversion, and a JPEG 2000 one is not
even decoded beyond the resolution level that keeps those ≥512 px (preprocess/j2k.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.pixels.processing import apply_color_lut

from preprocess.decode import decode_frame, frame_policy, is_lossy, transfer_syntax
from preprocess.errors import DecodeError, MalformedImageError
from preprocess.j2k import decode_reduced
from preprocess.window import modality, voi

# Longest side of the JPEG preview, and its quality.
DEFAULT_PREVIEW_MAX_SIZE = 512
DEFAULT_PREVIEW_QUALITY = 85
# Luminance weights (ITU-R BT.601) for colour → grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input (``model_repository/<model>/preprocess.json``)."""

    color: str = "grayscale"  # grayscale | rgb
    window: str = "auto"  # auto (tags, else automatic) | minmax (ignore tags)
    resize: str = "area"  # area | linear
    # none: the whole image is resized (squashed unless keep_aspect); center: the centred
    # square of the short edge's length is cut out first, as MedMNIST made its 2D sets from
    # non-square sources (PneumoniaMNIST, RetinaMNIST).
    crop: str = "none"
    # A Gaussian low-pass of sigma = 0.5 output pixels before the final resize, as an
    # anti-aliased resize (skimage's sigma = (scale - 1) / 2) smooths the data set's images.
    antialias: bool = False
    keep_aspect: bool = False
    mean: float = 0.5
    std: float = 0.5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"comment"})
        if unknown:
            raise ValueError(f"unknown preprocess settings {unknown}; known: {sorted(known)}")
        spec = cls(**{k: v for k, v in d.items() if k in known})
        if spec.color not in ("grayscale", "rgb") or spec.window not in ("auto", "minmax"):
            raise ValueError(f"unsupported preprocess spec {spec}")
        if spec.resize not in ("area", "linear") or spec.std <= 0:
            raise ValueError(f"unsupported preprocess spec {spec}")
        if spec.crop not in ("none", "center") or (spec.crop == "center" and spec.keep_aspect):
            raise ValueError(f"unsupported preprocess spec {spec} (crop: none | center)")
        return spec


# One model input: how to make it and its shape (C, H, W) from config.pbtxt.
Target = tuple[PreprocessSpec, tuple[int, int, int]]


@dataclass(frozen=True)
class Preprocessed:
    # float32, exactly each target's input shape (C, H, W), in the order the targets came.
    tensors: tuple[np.ndarray, ...]
    preview_jpeg: bytes
    warnings: tuple[str, ...]
    frame_index: int
    source: dict[str, Any]

    @property
    def tensor(self) -> np.ndarray:
        """The first target's tensor (the one a single-model caller asked for)."""
        return self.tensors[0]


def _interp(spec: PreprocessSpec) -> int:
    return cv2.INTER_AREA if spec.resize == "area" else cv2.INTER_LINEAR


def _fit(shape: tuple[int, int], longest: int) -> tuple[int, int]:
    rows, cols = shape
    scale = min(1.0, longest / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


# For the model tensor, a whole-block reduction that does not land exactly on the target keeps
# at least this many times the target's size: a second, fractional area step from just above
# the target (512 → 32 → 28) blurs the tensor measurably (≈ 4 points of triage accuracy); from
# 4× it does not. The preview (hundreds of pixels) takes the block step down to its size.
MODEL_BLOCK_MIN_MULTIPLE = 4


def _block_factor(shape: tuple[int, ...], size: tuple[int, int], min_multiple: int = 1) -> int:
    """The largest k ≥ 2 that divides both sides and either lands exactly on ``size`` or keeps
    the image at least ``min_multiple`` × ``size``; else 1."""
    rows, cols = shape[:2]
    if rows % size[0] == 0 and cols % size[1] == 0 and rows // size[0] == cols // size[1]:
        return rows // size[0]
    limit = min(rows // (size[0] * min_multiple), cols // (size[1] * min_multiple))
    common = math.gcd(rows, cols)
    return next((k for k in range(limit, 1, -1) if common % k == 0), 1)


def _shrink(
    arr: np.ndarray, size: tuple[int, int], interp: int, min_multiple: int = 1
) -> np.ndarray:
    if arr.shape[:2] == size:
        return arr
    if (
        arr.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64)
        or arr.dtype == np.float64
    ):
        arr = arr.astype(np.float32)
    if interp == cv2.INTER_AREA:
        # OpenCV averages whole k×k blocks (an exact integer ratio) several times faster than
        # fractional areas: a 2048×2500 frame goes to 512×625 first, then to the target.
        k = _block_factor(arr.shape, size, min_multiple)
        if k > 1:
            arr = cv2.resize(arr, (arr.shape[1] // k, arr.shape[0] // k), interpolation=interp)
            if arr.shape[:2] == size:
                return np.asarray(arr)
    # cv2 takes (width, height).
    return np.asarray(cv2.resize(arr, (size[1], size[0]), interpolation=interp))


def _display(arr: np.ndarray, ds: Dataset, spec: PreprocessSpec) -> tuple[np.ndarray, list[str]]:
    """Decoded frame → display values in [0, 1]: (rows, cols) gray or (rows, cols, 3) RGB."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    warnings: list[str] = []
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, ds))
        warnings.append("palette_color")
        peak = 255.0 if rgb.dtype == np.uint8 else float(max(1, int(rgb.max())))
        return rgb.astype(np.float32) / np.float32(peak), warnings
    if arr.ndim == 3:  # RGB or YBR (pydicom converts YBR to RGB)
        bits = int(ds.get("BitsStored", 8) or 8)
        return arr.astype(np.float32) / np.float32((1 << bits) - 1), warnings
    values = modality(arr, ds)
    if spec.window == "minmax":
        lo, hi = float(values.min()), float(values.max())
        display = (values - lo) / (hi - lo if hi > lo else 1.0)
    else:
        display, voi_warnings = voi(values, ds, mode=spec.window)
        warnings += voi_warnings
    if photometric == "MONOCHROME1":
        display = 1.0 - display
        warnings.append("monochrome1_inverted")
    elif photometric not in ("MONOCHROME2", ""):
        warnings.append(f"unusual_photometric:{photometric.replace(' ', '_').lower()}")
    return display.astype(np.float32, copy=False), warnings


def _jpeg(display: np.ndarray, quality: int) -> bytes:
    img: np.ndarray = np.clip(display * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(
        ".jpg",
        img,
        [
            cv2.IMWRITE_JPEG_QUALITY,
            quality,
            cv2.IMWRITE_JPEG_PROGRESSIVE,
            1,
            cv2.IMWRITE_JPEG_OPTIMIZE,
            1,
        ],
    )
    if not ok:
        raise DecodeError("JPEG preview could not be encoded")
    return bytes(buf)


def _center_square(display: np.ndarray) -> np.ndarray:
    rows, cols = display.shape[:2]
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return display[top : top + side, left : left + side]


# Before the anti-aliasing blur, an image is first area-reduced to this many times the output
# size, so the blur runs on a small image (its kernel is then ~13 px, not ~50).
_ANTIALIAS_OVERSAMPLE = 4
# The blur's sigma in output pixels (skimage's (scale - 1) / 2 for large scales).
ANTIALIAS_SIGMA_OUT = 0.5


def _resample(display: np.ndarray, spec: PreprocessSpec, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (rows, cols) as the model's data set was resized."""
    rows, cols = display.shape[:2]
    if spec.antialias and rows > size[0] and cols > size[1]:
        factor = min(_ANTIALIAS_OVERSAMPLE, rows // size[0], cols // size[1])
        mid = (size[0] * factor, size[1] * factor)
        display = _shrink(display, mid, cv2.INTER_AREA, MODEL_BLOCK_MIN_MULTIPLE)
        display = display.astype(np.float32, copy=False)
        sigma = ANTIALIAS_SIGMA_OUT * factor
        display = cv2.GaussianBlur(display, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return _shrink(display, size, _interp(spec), MODEL_BLOCK_MIN_MULTIPLE)


def to_model_input(
    display: np.ndarray, spec: PreprocessSpec, shape: tuple[int, int, int]
) -> np.ndarray:
    """Display values in [0, 1] ((rows, cols) or (rows, cols, 3)) → the model's tensor:
    colour, crop, resize and normalisation as ``spec`` says. Pure; ``training/`` uses it to
    put training images through exactly what serving does."""
    channels, height, width = shape
    if spec.color == "grayscale" and display.ndim == 3:
        display = display @ _LUMA
    elif spec.color == "rgb" and display.ndim == 2:
        display = np.repeat(display[:, :, None], 3, axis=2)
    if spec.crop == "center":
        display = _center_square(display)
    if spec.keep_aspect:
        rows, cols = display.shape[:2]
        scale = min(height / rows, width / cols)
        inner = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        small = _resample(display, spec, inner)
        canvas = np.zeros((height, width, *display.shape[2:]), dtype=np.float32)
        top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
        canvas[top : top + inner[0], left : left + inner[1]] = small
        small = canvas
    else:
        small = _resample(display, spec, (height, width))
    small = (small.astype(np.float32) - np.float32(spec.mean)) / np.float32(spec.std)
    tensor = small[None] if small.ndim == 2 else np.transpose(small, (2, 0, 1))
    if tensor.shape != shape:
        raise MalformedImageError(f"cannot shape the image into the model input {shape}")
    return np.ascontiguousarray(tensor, dtype=np.float32)


def reduce_for_preview(arr: np.ndarray, preview_max_size: int) -> np.ndarray:
    """The size reduction every decoded frame gets before float work: the longest side to at
    most ``preview_max_size`` by area averaging (whole blocks where the ratio allows)."""
    return _shrink(arr, _fit(arr.shape[:2], preview_max_size), cv2.INTER_AREA)


def preprocess(
    ds: Dataset,
    spec: PreprocessSpec,
    input_shape: tuple[int, int, int],
    *,
    preview_max_size: int = DEFAULT_PREVIEW_MAX_SIZE,
    preview_quality: int = DEFAULT_PREVIEW_QUALITY,
) -> Preprocessed:
    """One model input and the preview (``preprocess_for`` with one target)."""
    return preprocess_for(
        ds,
        [(spec, input_shape)],
        preview_max_size=preview_max_size,
        preview_quality=preview_quality,
    )


def preprocess_for(
    ds: Dataset,
    targets: Sequence[Target],
    *,
    preview_max_size: int = DEFAULT_PREVIEW_MAX_SIZE,
    preview_quality: int = DEFAULT_PREVIEW_QUALITY,
) -> Preprocessed:
    """Decode once; one tensor per target (each model's own spec and shape) and the preview.

    Reads (0028,0008) NumberOfFrames, (0028,0004) PhotometricInterpretation, the modality
    and VOI attributes (see ``window``), (0028,2110) LossyImageCompression.

    Every failure is a PreprocessError: malformed attributes that slip past pydicom's
    parser surface here as MalformedImageError, never as a stray TypeError."""
    if not targets:
        raise ValueError("preprocess_for needs at least one target")
    try:
        return _preprocess(ds, targets, preview_max_size, preview_quality)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise MalformedImageError(
            f"image attributes are inconsistent ({type(exc).__name__}: {exc})"
        ) from exc


def _preprocess(
    ds: Dataset,
    targets: Sequence[Target],
    preview_max_size: int,
    preview_quality: int,
) -> Preprocessed:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frame_policy(frames)
    # JPEG 2000 stops at the resolution kept below (preprocess/j2k.py); else a full decode.
    arr = decode_reduced(ds, index, frames, keep=preview_max_size)
    if arr is None:
        arr = decode_frame(ds, index, frames)
    warnings: list[str] = []
    if frames > 1:
        warnings.append(f"frames_dropped:{frames - 1}")
    if is_lossy(ds):
        warnings.append("lossy_source")
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        raise MalformedImageError(f"unexpected decoded shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    # Palette indices must not be averaged; apply the LUT at full size for those.
    if photometric != "PALETTE COLOR":
        arr = reduce_for_preview(arr, preview_max_size)
    # The display image depends on the spec's window mode only; one per mode asked for.
    displays: dict[str, np.ndarray] = {}
    display_warnings: list[str] = []
    for spec, _ in targets:
        if spec.window not in displays:
            displays[spec.window], display_warnings = _display(arr, ds, spec)
    if photometric == "PALETTE COLOR":
        displays = {k: reduce_for_preview(v, preview_max_size) for k, v in displays.items()}
    warnings += display_warnings
    for mode, display in displays.items():
        if not np.all(np.isfinite(display)):
            displays[mode] = np.nan_to_num(display, nan=0.0, posinf=1.0, neginf=0.0)
            if "non_finite_values" not in warnings:
                warnings.append("non_finite_values")
    tensors = tuple(to_model_input(displays[spec.window], spec, shape) for spec, shape in targets)
    return Preprocessed(
        tensors=tensors,
        preview_jpeg=_jpeg(displays[targets[0][0].window], preview_quality),
        warnings=tuple(warnings),
        frame_index=index,
        source={
            "rows": int(ds.get("Rows", 0) or 0),
            "columns": int(ds.get("Columns", 0) or 0),
            "frames": frames,
            "photometric": photometric,
            "transfer_syntax_uid": transfer_syntax(ds),
            "modality": str(ds.get("Modality", "")),
            "bits_stored": int(ds.get("BitsStored", 0) or 0),
        },
    )
