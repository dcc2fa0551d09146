"""Reading bytes as DICOM and vetting an image before anything is decoded."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from preprocess.errors import (
    ImageTooLargeError,
    MalformedImageError,
    NoPixelDataError,
    NotAnImageError,
    NotDicomError,
    PreprocessError,
    UnsupportedTransferSyntaxError,
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
    raw = _without_stale_meta(raw)
    _check_inflated_size(io.BytesIO(raw))
    try:
        return _parse(io.BytesIO(raw), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except PreprocessError:
        raise
    except _TooManyElements as exc:
        raise MalformedImageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise NotDicomError(f"not readable as DICOM ({type(exc).__name__}: {exc})") from exc
    # No 'DICM' preamble: accept only if a forced parse finds a plausible dataset.
    try:
        ds = _parse(
            io.BytesIO(raw), force=True, stop_before_pixels=stop_before_pixels, settle=False
        )
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
    _settle_transfer_syntax(ds)
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


# Explicit VR little endian (the File Meta's encoding): VRs with a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_META_START = 132  # 128-byte preamble + 'DICM'


def _without_stale_meta(raw: bytes) -> bytes:
    """``raw`` without group-0002 elements that follow the File Meta its (0002,0000)
    FileMetaInformationGroupLength bounds. Such a stale block (left by a tool that rewrote
    the file) is not File Meta (PS3.10 7.1), but a parser reading group 0002 until the group
    changes takes its TransferSyntaxUID over the real one and misreads the data set."""
    if (
        raw[128:_META_START] != b"DICM"
        or raw[_META_START : _META_START + 6] != b"\x02\x00\x00\x00UL"
    ):
        return raw
    end = _META_START + 12 + struct.unpack_from("<I", raw, _META_START + 8)[0]
    at = end
    while raw[at : at + 2] == b"\x02\x00" and len(raw) >= at + 8:
        vr = raw[at + 4 : at + 6]
        if not vr.isalpha() or not vr.isupper():
            return raw  # not explicit VR: leave it to the parser
        if vr in _LONG_VRS:
            if len(raw) < at + 12:
                return raw
            at += 12 + struct.unpack_from("<I", raw, at + 8)[0]
        else:
            at += 8 + struct.unpack_from("<H", raw, at + 6)[0]
    return raw if at == end or at > len(raw) else raw[:end] + raw[at:]


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
    settle: bool = True,
) -> Dataset:
    """pydicom's ``dcmread`` with the element budget as its ``stop_when``; the transfer
    syntax settled as decoding will need it (``_settle_transfer_syntax``) unless not
    ``settle``."""
    budget = _element_budget(stop_before_pixels)
    if isinstance(source, Path):
        with source.open("rb") as fh:
            ds = read_partial(fh, budget, defer_size=defer_size, force=force)
    else:
        ds = read_partial(source, budget, defer_size=defer_size, force=force)
    if settle:
        _settle_transfer_syntax(ds)
    return ds


# The native transfer syntax of each encoding pydicom deduces from the data set itself,
# keyed by (implicit VR, little endian).
_NATIVE_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def _settle_transfer_syntax(ds: Dataset) -> None:
    """A data set without a (0002,0010) TransferSyntaxUID (no File Meta, or one without it)
    gets the native syntax its encoding was deduced as, as DCMTK does: decoding needs it,
    and ingest then stores what the worker will decode. Encapsulated pixel data (undefined
    length) names no codec, so it is refused here rather than failing in a worker."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    encoding = getattr(ds, "original_encoding", (None, None))
    syntax = _NATIVE_SYNTAX.get((bool(encoding[0]), bool(encoding[1])))
    element = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    undefined = getattr(element, "is_undefined_length", False)
    if element is not None and (undefined or getattr(element, "length", 0) == 0xFFFFFFFF):
        raise UnsupportedTransferSyntaxError(
            "the file has no (0002,0010) TransferSyntaxUID and its pixel data is compressed "
            "(encapsulated): the codec cannot be known; send it as a DICOM Part 10 file "
            "with its File Meta"
        )
    if syntax is None or encoding[0] is None:
        return
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax


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
