"""JPEG 2000 decoded at a reduced resolution level (preprocess/j2k.py): used where it keeps
the preview's size, equal to the full decode area-averaged to that size, and never the
reason a file fails (anything it cannot do falls back to the full decode)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

import preprocess as pp
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT
from preprocess import pipeline
from preprocess.j2k import decode_reduced, reduce_level

SHAPE = (1, 28, 28)


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _encoded(ds: pydicom.Dataset) -> bytes:
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big() -> tuple[bytes, np.ndarray]:
    """A 1024×1280 12-bit radiograph as JPEG 2000 lossless, and its full-size pixels."""
    images, _ = load_samples()
    ds = _dataset(radiograph(images[3], study_uid=generate_uid(), size=(1024, 1280)))
    pixels = ds.pixel_array.copy()
    return _encoded(ds), pixels


def _area(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(pixels.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def test_reduce_level_keeps_the_longest_side() -> None:
    assert reduce_level(2048, 2500, 512, levels=5) == 2  # 512×625
    assert reduce_level(1024, 1280, 256, levels=5) == 2  # 256×320
    assert reduce_level(1000, 800, 512, levels=5) == 0  # 500 would be too small
    assert reduce_level(4096, 4096, 512, levels=2) == 2  # no more than the codestream has
    assert reduce_level(512, 512, 512, levels=5) == 0


def test_a_large_j2k_is_decoded_at_the_level_kept(big: tuple[bytes, np.ndarray]) -> None:
    data, pixels = big
    arr = decode_reduced(_dataset(data), 0, 1, keep=256)
    assert arr is not None and arr.shape == (256, 320)
    assert arr.dtype == pixels.dtype
    # The wavelet's low-pass approximation is the full image area-averaged but for a slightly
    # different filter: within 3 % of the range at sharp edges, 0.5 % on average.
    span = float(pixels.max() - pixels.min())
    diff = np.abs(arr.astype(np.float32) - _area(pixels, arr.shape))
    assert diff.max() <= 0.03 * span
    assert diff.mean() <= 0.005 * span
    # Keeping more than half the image means decoding it in full: nothing to gain.
    assert decode_reduced(_dataset(data), 0, 1, keep=700) is None


def test_preprocessing_a_reduced_decode_matches_the_full_one(
    big: tuple[bytes, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = big
    spec = pp.PreprocessSpec()
    fast = pp.preprocess(pp.read_dicom(data), spec, SHAPE, preview_max_size=256)
    monkeypatch.setattr(pipeline, "decode_reduced", lambda *a, **k: None)
    full = pp.preprocess(pp.read_dicom(data), spec, SHAPE, preview_max_size=256)
    assert fast.warnings == full.warnings
    gap = np.abs(fast.tensor - full.tensor)  # tensor values span [-1, 1]
    assert gap.max() < 0.05
    assert gap.mean() < 0.01
    a, b = (
        cv2.imdecode(np.frombuffer(p.preview_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
        for p in (fast, full)
    )
    assert a.shape == b.shape == (205, 256)
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 1.5  # of 255 grey levels


def test_the_triage_model_answers_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the sample images as 1024×1280 JPEG 2000 radiographs: the same class, and class
    probabilities within 0.02 of the full decode's."""
    sess = ort.InferenceSession(
        str(REPO_ROOT / "model_repository" / "triage" / "2" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    name = sess.get_inputs()[0].name
    images, _ = load_samples()
    for image in images[:8]:
        data = _encoded(_dataset(radiograph(image, study_uid=generate_uid(), size=(1024, 1280))))
        fast = pp.preprocess(pp.read_dicom(data), pp.PreprocessSpec(), SHAPE).tensor
        with monkeypatch.context() as m:
            m.setattr(pipeline, "decode_reduced", lambda *a, **k: None)
            full = pp.preprocess(pp.read_dicom(data), pp.PreprocessSpec(), SHAPE).tensor
        p_fast, p_full = (sess.run(None, {name: t[None]})[0][0] for t in (fast, full))
        assert p_fast.argmax() == p_full.argmax()
        assert np.abs(p_fast - p_full).max() < 0.02


def test_signed_pixels_keep_their_sign() -> None:
    images, _ = load_samples()
    ds = _dataset(radiograph(images[5], study_uid=generate_uid(), size=(1024, 1024)))
    hu = ds.pixel_array.astype(np.int16) - 2048  # -2048 .. 2047, as CT stores HU
    ds.PixelRepresentation = 1
    ds.PixelData = hu.tobytes()
    data = _encoded(ds)
    arr = decode_reduced(_dataset(data), 0, 1, keep=256)
    assert arr is not None and arr.dtype == np.int16 and arr.shape == (256, 256)
    assert arr.min() < 0
    diff = np.abs(arr.astype(np.float32) - _area(hu, arr.shape))
    assert diff.max() <= 0.03 * 4095
    assert diff.mean() <= 0.005 * 4095


def test_images_it_does_not_handle_are_left_to_the_full_decode(
    big: tuple[bytes, np.ndarray],
) -> None:
    data, _ = big
    small = _dataset(data)
    small.Rows = 300  # contradicts the codestream's 1024 rows
    assert decode_reduced(small, 0, 1, keep=256) is None
    colour = _dataset(data)
    colour.SamplesPerPixel = 3
    assert decode_reduced(colour, 0, 1, keep=256) is None
    images, _ = load_samples()
    plain = _dataset(radiograph(images[0], study_uid=generate_uid(), size=(1024, 1280)))
    assert decode_reduced(plain, 0, 1, keep=256) is None  # not JPEG 2000


def test_a_corrupt_codestream_fails_as_it_did_before(
    big: tuple[bytes, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = big
    ds = _dataset(data)
    raw = bytearray(ds.PixelData)
    raw[400:4000] = bytes(3600)  # wipe part of the first tile's data
    ds.PixelData = bytes(raw)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    broken = buf.getvalue()
    decode_reduced(_dataset(broken), 0, 1, keep=256)  # an array or None: it never raises

    def outcome() -> str:
        try:
            pp.preprocess(pp.read_dicom(broken), pp.PreprocessSpec(), SHAPE, preview_max_size=256)
        except pp.PreprocessError as exc:
            return exc.category
        return "ok"

    with_shortcut = outcome()
    monkeypatch.setattr(pipeline, "decode_reduced", lambda *a, **k: None)
    assert with_shortcut == outcome()


def test_the_frame_asked_for_is_the_one_decoded() -> None:
    images, _ = load_samples()
    frames = np.stack(
        [
            _dataset(radiograph(images[i], study_uid=generate_uid(), size=(1024, 1024))).pixel_array
            for i in (1, 2, 3)
        ]
    )
    ds = _dataset(radiograph(images[1], study_uid=generate_uid(), size=(1024, 1024)))
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    data = _encoded(ds)
    arr = decode_reduced(_dataset(data), 1, 3, keep=256)
    assert arr is not None and arr.shape == (256, 256)
    gaps = [np.abs(arr.astype(np.float32) - _area(f, arr.shape)).mean() for f in frames]
    assert int(np.argmin(gaps)) == 1
    assert gaps[1] <= 0.005 * 4095
