"""Reading bytes as DICOM and vetting an image before anything is decoded."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from preprocess.errors import (
    ImageTooLargeError,
    MalformedImageError,
    NoPixelDataError,
    NotAnImageError,
    NotDicomError,
    PreprocessError,
)

# Decompression-bomb guard: declared Rows × Columns × Frames × SamplesPerPixel above this is
# refused before decoding (400 M samples ≈ 800 MB at 16 bits).
DEFAULT_MAX_PIXELS = 400_000_000
# A forced (preamble-less) parse must find at least this many elements to count as DICOM.
_MIN_FORCED_ELEMENTS = 3
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Real data sets have hundreds of top-level elements (a few thousand with private groups);
# megabytes of tiny elements (e.g. zeros: tag 0, length 0) would keep pydicom busy for
# minutes and gigabytes, so a data set with more is refused as it is read.
MAX_ELEMENTS = 50_000
# A deflated data set (1.2.840.10008.1.2.1.99) is inflated whole by pydicom: one inflating
# beyond this is refused first (a few MB of deflate stream can hold gigabytes).
MAX_INFLATED_BYTES = 128 * 1024 * 1024
_INFLATE_CHUNK_BYTES = 1024 * 1024
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
    _check_inflated_size(io.BytesIO(raw))
    try:
        return _parse(io.BytesIO(raw), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except _TooManyElements as exc:
        raise MalformedImageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise NotDicomError(f"not readable as DICOM ({type(exc).__name__}: {exc})") from exc
    # No 'DICM' preamble: accept only if a forced parse finds a plausible dataset.
    try:
        ds = _parse(io.BytesIO(raw), force=True, stop_before_pixels=stop_before_pixels)
        elements = list(ds.keys())
    except _TooManyElements as exc:
        raise MalformedImageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001
        raise NotDicomError(
            "not DICOM: no 'DICM' preamble and the bytes do not parse as a dataset"
        ) from exc
    groups = {tag.group for tag in elements}
    if len(elements) < _MIN_FORCED_ELEMENTS or not groups & {0x0008, 0x0010, 0x0020, 0x0028}:
        raise NotDicomError("not DICOM: no 'DICM' preamble and no recognisable DICOM elements")
    return ds


def read_header(
    source: Path | BinaryIO, *, defer_size: int | None = None, stop_before_pixels: bool = False
) -> Dataset:
    """A Part 10 file's data set read from disk (or an open file) rather than from bytes in
    memory: values over ``defer_size`` bytes (the pixel data) stay on disk until read. The same
    limits as ``read_dicom``."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as fh:
                _check_inflated_size(fh)
        else:
            start = source.tell()
            _check_inflated_size(source)
            source.seek(start)
        return _parse(source, defer_size=defer_size, stop_before_pixels=stop_before_pixels)
    except PreprocessError:
        raise
    except _TooManyElements as exc:
        raise MalformedImageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise NotDicomError(f"not readable as DICOM Part 10 ({type(exc).__name__}: {exc})") from exc


class _TooManyElements(Exception):
    pass


def _element_budget(stop_before_pixels: bool) -> Callable[[BaseTag, str | None, int], bool]:
    """pydicom's ``stop_when`` hook (called per top-level element): counts them."""
    count = 0

    def stop_when(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal count
        count += 1
        if count > MAX_ELEMENTS:
            raise _TooManyElements(
                f"the data set holds more than {MAX_ELEMENTS:,} elements: not a plausible "
                "DICOM file (corrupt or padded with junk)"
            )
        return stop_before_pixels and int(tag) in _PIXEL_TAGS

    return stop_when


def _parse(
    source: BinaryIO | Path,
    *,
    force: bool = False,
    stop_before_pixels: bool = False,
    defer_size: int | None = None,
) -> Dataset:
    """pydicom's ``dcmread`` with the element budget as its ``stop_when``."""
    budget = _element_budget(stop_before_pixels)
    if isinstance(source, Path):
        with source.open("rb") as fh:
            return read_partial(fh, budget, defer_size=defer_size, force=force)
    return read_partial(source, budget, defer_size=defer_size, force=force)


def _check_inflated_size(fh: BinaryIO) -> None:
    """Refuse a deflated data set that inflates beyond MAX_INFLATED_BYTES, inflating it in
    bounded pieces (nothing kept). Reads the (0002,0010) TransferSyntaxUID of the file meta;
    files without a readable file meta are left to the parser."""
    try:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
    except Exception:  # noqa: BLE001 - not Part 10: the parser reports it
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or fh.read(_INFLATE_CHUNK_BYTES)
            if not chunk:
                break
            total += len(inflater.decompress(chunk, _INFLATE_CHUNK_BYTES))
            if total > MAX_INFLATED_BYTES:
                raise ImageTooLargeError(
                    f"the deflated data set inflates to more than {MAX_INFLATED_BYTES:,} bytes;"
                    " send it uncompressed or with an image compression transfer syntax"
                )
    except zlib.error as exc:
        raise NotDicomError(f"the deflated data set is corrupt ({exc})") from exc


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
