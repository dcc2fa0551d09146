"""The decode sandbox: same output as decoding in-process; a hang, a crash or a memory blow-up
costs one file (a categorized PreprocessError) and the next file is decoded by a fresh child."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from preprocess import (
    DecoderCrashedError,
    DecodeTimeoutError,
    ImageTooLargeError,
    NotDicomError,
    PreprocessSpec,
)
from preprocess.sandbox import DecodeSandbox, decode

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import sandbox_faults  # noqa: E402 - importable by the spawned child through sys.path

SHAPE = (1, 28, 28)
LIMITS = {"max_pixels": 10**8, "preview_max_size": 256, "preview_quality": 85}
MEMORY_MB = 1536
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def box() -> Iterator[DecodeSandbox]:
    sandbox = DecodeSandbox(memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S)
    yield sandbox
    sandbox.close()


def _ct() -> bytes:
    return Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()


def test_sandbox_output_equals_in_process_decoding(box: DecodeSandbox) -> None:
    spec = PreprocessSpec()
    inside = box.run(_ct(), [(spec, SHAPE)], **LIMITS)
    here = decode(_ct(), [(spec, SHAPE)], **LIMITS)

    assert box.pid is not None and box.pid != os.getpid()
    np.testing.assert_array_equal(inside.tensor, here.tensor)
    assert inside.preview_jpeg == here.preview_jpeg
    assert inside.warnings == here.warnings


def test_a_bad_file_is_the_usual_categorized_error(box: DecodeSandbox) -> None:
    with pytest.raises(NotDicomError):
        box.run(b"not a dicom file at all", [(PreprocessSpec(), SHAPE)], **LIMITS)
    assert box.call(sandbox_faults.pid) == box.pid  # the child survived it


def test_a_hang_is_stopped_at_the_deadline_and_the_next_file_works(box: DecodeSandbox) -> None:
    before = box.call(sandbox_faults.pid)
    started = time.monotonic()
    with pytest.raises(DecodeTimeoutError):
        box.call(sandbox_faults.sleep, 60)
    assert time.monotonic() - started < TIMEOUT_S + 2
    assert box.call(sandbox_faults.pid) != before  # a fresh child
    assert box.run(_ct(), [(PreprocessSpec(), SHAPE)], **LIMITS).tensor.shape == SHAPE


def test_a_crash_costs_one_file_not_the_caller(box: DecodeSandbox) -> None:
    before = box.call(sandbox_faults.pid)
    with pytest.raises(DecoderCrashedError):
        box.call(sandbox_faults.abort)
    assert box.call(sandbox_faults.pid) not in (before, os.getpid())
    assert box.run(_ct(), [(PreprocessSpec(), SHAPE)], **LIMITS).tensor.shape == SHAPE


def test_an_answer_that_cannot_be_read_costs_that_call_only(box: DecodeSandbox) -> None:
    before = box.call(sandbox_faults.pid)
    with pytest.raises(RuntimeError, match="cannot be read"):
        box.call(sandbox_faults.unreadable_answer)
    # The next call gets its own answer, from a fresh child: nothing stale is left in the pipe.
    after = box.call(sandbox_faults.pid)
    assert after not in (before, os.getpid())
    assert box.run(_ct(), [(PreprocessSpec(), SHAPE)], **LIMITS).tensor.shape == SHAPE


def test_memory_beyond_the_limit_is_refused_not_granted(box: DecodeSandbox) -> None:
    # More than the whole address-space limit: the child cannot have it.
    with pytest.raises((ImageTooLargeError, DecoderCrashedError)):
        box.call(sandbox_faults.allocate, MEMORY_MB * 2)
    # Modest allocations still work in the same or a fresh child.
    assert box.call(sandbox_faults.allocate, 64) == 64 * 2**20
