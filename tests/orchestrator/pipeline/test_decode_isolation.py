"""Which files the worker decodes in its sandbox: those a codec decodes (compressed pixel data,
or a transfer syntax it does not know), not uncompressed ones, unless configured to; a file
whose bytes contradict its instance row goes to the sandbox."""

from __future__ import annotations

import io
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from orchestrator.pipeline.context import WorkerContext
from orchestrator.pipeline.prepare import _decode
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import WorkerSettings
from preprocess import PreprocessSpec
from preprocess.sandbox import CodecNeeded, DecodeSandbox, decode, needs_codec

SHAPE = (1, 28, 28)
LIMITS = {"max_pixels": 10**8, "preview_max_size": 256, "preview_quality": 85}


class RecordingSandbox(DecodeSandbox):
    def __init__(self) -> None:
        super().__init__(memory_mb=1536, timeout_s=30.0)
        self.runs = 0

    def run(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return super().run(data, *args, **kwargs)


@pytest.fixture(scope="module")
def box() -> Iterator[RecordingSandbox]:
    sandbox = RecordingSandbox()
    yield sandbox
    sandbox.close()


def _uncompressed() -> bytes:
    images, _ = load_samples()
    return radiograph(images[0], study_uid=generate_uid(), size=64)


def _rle() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_uncompressed()))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ctx(box: DecodeSandbox, *, uncompressed_too: bool = False) -> WorkerContext:
    settings = WorkerSettings(decode_isolation_uncompressed=uncompressed_too)
    return cast(WorkerContext, SimpleNamespace(settings=settings, sandbox=box))


def test_needs_codec_for_all_but_the_native_syntaxes() -> None:
    assert not needs_codec(ExplicitVRLittleEndian)
    assert not needs_codec("1.2.840.10008.1.2")  # implicit VR little endian
    assert needs_codec(RLELossless)
    assert needs_codec(JPEG2000Lossless)
    assert needs_codec("")
    assert needs_codec(None)


def test_uncompressed_pixel_data_is_decoded_in_the_worker(box: RecordingSandbox) -> None:
    before = box.runs
    out = _decode(_ctx(box), _uncompressed(), ExplicitVRLittleEndian, [(PreprocessSpec(), SHAPE)])
    assert box.runs == before
    assert out.tensor.shape == SHAPE


def test_compressed_pixel_data_is_decoded_in_the_sandbox(box: RecordingSandbox) -> None:
    before = box.runs
    out = _decode(_ctx(box), _rle(), RLELossless, [(PreprocessSpec(), SHAPE)])
    assert box.runs == before + 1
    # The same pixels either way: RLE is lossless.
    here = decode(_uncompressed(), [(PreprocessSpec(), SHAPE)], **LIMITS)
    np.testing.assert_array_equal(out.tensor, here.tensor)


def test_the_setting_sends_uncompressed_files_to_the_sandbox_too(box: RecordingSandbox) -> None:
    before = box.runs
    _decode(
        _ctx(box, uncompressed_too=True),
        _uncompressed(),
        ExplicitVRLittleEndian,
        [(PreprocessSpec(), SHAPE)],
    )
    assert box.runs == before + 1


def test_a_file_that_contradicts_its_row_goes_to_the_sandbox(box: RecordingSandbox) -> None:
    with pytest.raises(CodecNeeded):
        decode(_rle(), [(PreprocessSpec(), SHAPE)], **LIMITS, native_only=True)
    before = box.runs
    out = _decode(_ctx(box), _rle(), ExplicitVRLittleEndian, [(PreprocessSpec(), SHAPE)])
    assert box.runs == before + 1
    assert np.isfinite(out.tensor).all()
