"""Decoding one frame of pixel data, with codec errors translated into our categories."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from preprocess.errors import (
    DecodeError,
    MalformedImageError,
    TruncatedError,
    UnsupportedTransferSyntaxError,
)

# Transfer syntaxes whose compression loses information.
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (may be lossy)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (may be lossy)
        "1.2.840.10008.1.2.4.100",  # MPEG2
        "1.2.840.10008.1.2.4.102",  # MPEG-4
        "1.2.840.10008.1.2.4.110",  # JPEG XL
    }
)


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def is_lossy(ds: Dataset) -> bool:
    """(0028,2110) LossyImageCompression == '01', or a lossy transfer syntax."""
    return (
        str(ds.get("LossyImageCompression", "")) == "01"
        or transfer_syntax(ds) in LOSSY_TRANSFER_SYNTAXES
    )


def frame_policy(frames: int) -> int:
    """Which frame goes to the model: the middle one (for a cine or a slab it is the most
    representative single frame; the others are reported as dropped)."""
    return frames // 2


def decode_frame(ds: Dataset, index: int, frames: int) -> np.ndarray:
    """Decode one frame: (rows, cols) or (rows, cols, samples); YBR converted to RGB."""
    ts = transfer_syntax(ds)
    try:
        arr = pixel_array(ds, index=index if frames > 1 else None)
    except NotImplementedError as exc:
        name = UID(ts).name if ts else "unknown transfer syntax"
        raise UnsupportedTransferSyntaxError(
            f"no installed decoder handles {name} for this image ({exc})"
        ) from exc
    except (RuntimeError, ValueError, AttributeError, KeyError, TypeError, OSError) as exc:
        text = str(exc)
        lower = text.lower()
        if (
            "plugin" in lower
            or "decoder" in lower
            and "available" in lower
            or "no pixel data decoders" in lower
        ):
            name = UID(ts).name if ts else "unknown transfer syntax"
            raise UnsupportedTransferSyntaxError(f"cannot decode {name}: {text}") from exc
        if (
            "length" in lower
            or "truncat" in lower
            or "buffer" in lower
            or "enough" in lower
            or "end of" in lower
        ):
            raise TruncatedError(f"pixel data is shorter than the image declares: {text}") from exc
        if isinstance(exc, AttributeError | KeyError):
            raise MalformedImageError(f"image attributes missing or inconsistent: {text}") from exc
        raise DecodeError(f"pixel data could not be decoded: {text}") from exc
    except Exception as exc:  # noqa: BLE001 - codec libraries raise their own types
        raise DecodeError(f"pixel data could not be decoded ({type(exc).__name__}: {exc})") from exc
    except BaseException as exc:
        # Rust codecs (pylibjpeg-rle, ...) turn a panic on corrupt data into pyo3's
        # PanicException, a BaseException that would otherwise escape every handler.
        if type(exc).__name__ != "PanicException":
            raise
        raise DecodeError(f"pixel data could not be decoded (codec panic: {exc})") from exc
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames and index is not None:
        arr = arr[index]
    return np.asarray(arr)
