"""Inputs that cost far more to read than their size: refused quickly with a categorized error,
in bounded memory. A deflated data set is inflated in bounded pieces before pydicom inflates it
whole; a data set of millions of tiny elements is cut off at MAX_ELEMENTS; a Rust codec's panic
on corrupt pixel data is a DecodeError, not a BaseException that escapes every handler."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid

import preprocess as pp
from orchestrator.samples import load_samples, radiograph
from preprocess.reader import MAX_INFLATED_BYTES

LIMIT_S = 3.0
_PIXEL_TAG = b"\xe0\x7f\x10\x00"


def _good(**tags: object) -> pydicom.Dataset:
    images, _ = load_samples()
    ds = pydicom.dcmread(io.BytesIO(radiograph(images[0], study_uid=generate_uid(), size=64)))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deflate_bomb(inflated: int) -> bytes:
    ds = _good()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    raw = _save(ds)
    meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 22)
    body = b"".join(co.compress(chunk) for _ in range(inflated // len(chunk))) + co.flush()
    return raw[:meta_end] + body


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    bomb = _deflate_bomb(4 * MAX_INFLATED_BYTES)
    assert len(bomb) < MAX_INFLATED_BYTES // 200
    before = _peak_rss_mib()
    for read in (
        lambda: pp.read_dicom(bomb),
        lambda: pp.read_header(_write(tmp_path / "bomb.dcm", bomb), defer_size=1024),
    ):
        started = time.perf_counter()
        with pytest.raises(pp.ImageTooLargeError, match="inflates to more than"):
            read()
        assert time.perf_counter() - started < LIMIT_S
    # pydicom alone would hold the whole 512 MiB (and more) at once.
    assert _peak_rss_mib() - before < MAX_INFLATED_BYTES / 2**20 / 2


def test_a_small_deflated_file_still_reads() -> None:
    ds = _good()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assert pp.read_dicom(_save(ds)).Rows == 64


def test_a_corrupt_deflate_stream_is_not_dicom() -> None:
    bomb = _deflate_bomb(0)
    with pytest.raises(pp.NotDicomError):
        pp.read_dicom(bomb[:-2] + bytes(range(256)) * 8)


def test_megabytes_of_zero_length_elements_are_cut_off(tmp_path: Path) -> None:
    good = _save(_good())
    junk = good[: good.rindex(_PIXEL_TAG)] + bytes(16 << 20)
    for read in (
        lambda: pp.read_dicom(junk),
        lambda: pp.read_header(_write(tmp_path / "junk.dcm", junk), defer_size=1024),
    ):
        started = time.perf_counter()
        with pytest.raises(pp.MalformedImageError, match="more than"):
            read()
        assert time.perf_counter() - started < LIMIT_S


def test_read_header_leaves_pixel_data_on_disk(tmp_path: Path) -> None:
    ds = pp.read_header(_write(tmp_path / "good.dcm", _save(_good())), defer_size=1024)
    element = ds.get_item("PixelData", keep_deferred=True)
    assert element.value is None and element.length == 64 * 64 * 2


def test_a_codec_panic_is_a_decode_error() -> None:
    ds = _good()
    ds.compress(RLELossless)
    raw = _save(ds)
    at = raw.rindex(_PIXEL_TAG) + 96
    corrupt = pp.read_dicom(raw[:at] + b"\x81" + raw[at + 1 :])
    with pytest.raises(pp.DecodeError, match="codec panic"):
        pp.preprocess(corrupt, pp.PreprocessSpec(), (1, 28, 28))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
