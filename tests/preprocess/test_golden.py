"""Golden files: expected shapes, warnings and value properties."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

import preprocess as pp

SHAPE = (1, 28, 28)
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


def _load(name: str) -> Dataset:
    """A pydicom bundled test file by name, or a ../shared/data/dicom file by relative path."""
    path = SHARED / name if "/" in name else get_testdata_file(name)
    assert path is not None, name
    return pp.read_dicom(Path(str(path)).read_bytes())


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        ("CT_small.dcm", None),
        ("MR_small.dcm", None),
        ("MR_small_bigendian.dcm", None),
        ("image_dfl.dcm", None),
        ("MR_small_RLE.dcm", None),
        ("MR_small_jpeg_ls_lossless.dcm", None),
        ("MR_small_jp2klossless.dcm", None),
        ("SC_rgb_rle.dcm", None),
        ("SC_ybr_full_422_uncompressed.dcm", None),
        ("SC_rgb_jpeg_dcmtk.dcm", "lossy_source"),
        ("JPEG2000.dcm", None),
        ("SC_rgb_rle_2frame.dcm", "frames_dropped:1"),
        ("examples_palette.dcm", "palette_color"),
        ("pydicom-data/RG3_J2KR.dcm", "monochrome1_inverted"),
        ("pydicom-data/OBXXXX1A.dcm", "palette_color"),
        ("pydicom-data/RG1_J2KI.dcm", "lossy_source"),
        ("MR_small_padded.dcm", None),
    ],
    ids=lambda v: str(v),
)
def test_golden_files_give_model_tensor(name: str, warning: str | None) -> None:
    out = pp.preprocess(_load(name), pp.PreprocessSpec(), SHAPE)
    assert out.tensor.shape == SHAPE and out.tensor.dtype == np.float32
    assert out.tensor.flags.c_contiguous
    assert np.all(np.isfinite(out.tensor))
    # (x - 0.5) / 0.5 of values in [0, 1] lies in [-1, 1] and is not constant.
    assert out.tensor.min() >= -1.0 - 1e-6 and out.tensor.max() <= 1.0 + 1e-6
    assert out.tensor.std() > 0.01
    assert out.preview_jpeg[:2] == b"\xff\xd8"
    if warning:
        assert warning in out.warnings


def test_window_tags_are_used_when_present() -> None:
    ds = _load("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    soft = pp.preprocess(ds, pp.PreprocessSpec(), SHAPE)
    ds.WindowCenter, ds.WindowWidth = 500, 3000
    bone = pp.preprocess(ds, pp.PreprocessSpec(), SHAPE)
    assert "no_window_auto_used" not in soft.warnings
    assert not np.allclose(soft.tensor, bone.tensor)


def test_monochrome1_is_inverted() -> None:
    ds = _load("MR_small.dcm")
    mono2 = pp.preprocess(ds, pp.PreprocessSpec(), SHAPE)
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = pp.preprocess(ds, pp.PreprocessSpec(), SHAPE)
    assert "monochrome1_inverted" in mono1.warnings
    # Inverting display values v → 1 - v maps the normalised tensor t → -t.
    np.testing.assert_allclose(mono1.tensor, -mono2.tensor, atol=1e-5)


def test_rgb_input_for_an_rgb_model() -> None:
    out = pp.preprocess(_load("SC_rgb_rle.dcm"), pp.PreprocessSpec(color="rgb"), (3, 32, 32))
    assert out.tensor.shape == (3, 32, 32)


def test_keep_aspect_pads() -> None:
    ds = _load("CT_small.dcm")
    ds.PixelData = np.zeros((128, 64), dtype=np.int16).tobytes()
    ds.Rows, ds.Columns = 128, 64
    out = pp.preprocess(ds, pp.PreprocessSpec(keep_aspect=True, mean=0.0, std=1.0), SHAPE)
    assert out.tensor.shape == SHAPE


def _bomb() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00" * 16
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_decompression_bomb_refused_before_decoding() -> None:
    started = time.perf_counter()
    ds = pp.read_dicom(_bomb())
    with pytest.raises(pp.ImageTooLargeError, match="exceeds the limit") as info:
        pp.check_image(ds)
    assert time.perf_counter() - started < 0.1
    assert info.value.category == "too_large" and info.value.http_status == 413


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", pp.NotDicomError),
        (b"hello, world: definitely not a DICOM file" * 10, pp.NotDicomError),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, pp.NotDicomError),
    ],
    ids=["empty", "text", "png"],
)
def test_non_dicom(data: bytes, error: type[pp.PreprocessError]) -> None:
    with pytest.raises(error):
        pp.read_dicom(data)


def test_truncated_pixel_data_is_categorized() -> None:
    raw = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    cut = raw[: len(raw) - 5000]
    with pytest.raises(pp.PreprocessError) as info:
        ds = pp.read_dicom(cut)
        pp.check_image(ds)
        pp.preprocess(ds, pp.PreprocessSpec(), SHAPE)
    assert info.value.category in ("truncated", "decode_failed", "not_dicom", "malformed")


def test_structured_report_is_not_an_image() -> None:
    sr = next(SHARED.rglob("*.dcm"), None)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    del ds.PixelData
    with pytest.raises(pp.NotAnImageError):
        pp.check_image(ds)
    assert sr is not None


def test_spec_from_dict_rejects_unknown_keys() -> None:
    assert pp.PreprocessSpec.from_dict({"comment": "x", "mean": 0.1}).mean == 0.1
    with pytest.raises(ValueError, match="unknown"):
        pp.PreprocessSpec.from_dict({"colour": "rgb"})
