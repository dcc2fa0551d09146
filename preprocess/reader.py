"""Reading bytes as DICOM and vetting an image before anything is decoded."""

from __future__ import annotations

import io
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from preprocess.errors import (
    ImageTooLargeError,
    MalformedImageError,
    NoPixelDataError,
    NotAnImageError,
    NotDicomError,
)

# Decompression-bomb guard: declared Rows × Columns × Frames × SamplesPerPixel above this is
# refused before decoding (400 M samples ≈ 800 MB at 16 bits).
DEFAULT_MAX_PIXELS = 400_000_000
# A forced (preamble-less) parse must find at least this many elements to count as DICOM.
_MIN_FORCED_ELEMENTS = 3
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# SOP classes that carry no image: SR, key objects, presentation states, RT plans and
# structures, encapsulated documents, waveforms, raw data.
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, KOS
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose without pixels is caught by pixel check
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, segmentation*
)


def read_dicom(data: bytes | BinaryIO, *, stop_before_pixels: bool = False) -> Dataset:
    """Parse DICOM Part 10 bytes (or a preamble-less / ACR-NEMA-style dataset).

    Raises NotDicomError for empty or non-DICOM input.
    """
    raw = data if isinstance(data, bytes) else data.read()
    if not raw:
        raise NotDicomError("empty file: expected DICOM Part 10 bytes")
    try:
        return dcmread(io.BytesIO(raw), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise NotDicomError(f"not readable as DICOM ({type(exc).__name__}: {exc})") from exc
    # No 'DICM' preamble: accept only if a forced parse finds a plausible dataset.
    try:
        ds = dcmread(io.BytesIO(raw), force=True, stop_before_pixels=stop_before_pixels)
        elements = list(ds.keys())
    except Exception as exc:  # noqa: BLE001
        raise NotDicomError(
            "not DICOM: no 'DICM' preamble and the bytes do not parse as a dataset"
        ) from exc
    groups = {tag.group for tag in elements}
    if len(elements) < _MIN_FORCED_ELEMENTS or not groups & {0x0008, 0x0010, 0x0020, 0x0028}:
        raise NotDicomError("not DICOM: no 'DICM' preamble and no recognisable DICOM elements")
    return ds


def check_image(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse what cannot become a model input, using declared tags only (nothing decoded).

    Reads (0008,0016) SOPClassUID, (7FE0,0010/0008/0009) pixel data, (0028,0010) Rows,
    (0028,0011) Columns, (0028,0008) NumberOfFrames, (0028,0002) SamplesPerPixel.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
    if not has_pixels:
        if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
            name = getattr(ds.get("SOPClassUID"), "name", sop_class)
            raise NotAnImageError(
                f"SOP class {name} carries no image; only image objects can be triaged"
            )
        raise NoPixelDataError("no pixel data element (7FE0,0010): nothing to analyse")
    try:
        rows = int(ds.Rows)
        columns = int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise MalformedImageError(
            "image attributes Rows (0028,0010) / Columns (0028,0011) / NumberOfFrames are"
            " missing or not numbers"
        ) from exc
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise MalformedImageError(f"declared image size {rows}×{columns}×{frames} is empty")
    declared = rows * columns * frames * samples
    if declared > max_pixels:
        raise ImageTooLargeError(
            f"declared image of {rows}×{columns}×{frames} frames×{samples} samples"
            f" ({declared:,} samples) exceeds the limit of {max_pixels:,}"
        )
