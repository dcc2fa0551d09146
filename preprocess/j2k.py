"""JPEG 2000 decoded at the resolution the pipeline keeps, not at full size.

A JPEG 2000 codestream is a wavelet pyramid: OpenJPEG can stop ``r`` levels short of full
resolution and return the image at 1/2^r of its size, a proper low-pass approximation in the
same units, without decoding the detail it would throw away. The pipeline keeps at most the
preview size (≤ 512 px on the longest side) before any float work, so a 2048×2500 radiograph
needs level 2 (512×625): decoding it costs a tenth of the full decode (24 against 286 ms on
our machine), and the image equals the full decode area-averaged to that size but for the
filter (the wavelet's low-pass, not a box): within 3 % of the range at sharp edges, 0.5 % on
average (tests/preprocess/test_j2k_reduced.py, which also checks the triage class).

pydicom's decoders (pylibjpeg-openjpeg) have no such option; glymur drives the system's
libopenjp2 and does, from a file. ``decode_reduced`` answers None wherever it does not apply
or fails for any reason, and the caller decodes in full as before, so a file's outcome and
error category never depend on this shortcut. It runs where the codec runs: in the decode
sandbox.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.encaps import get_frame

from preprocess.decode import transfer_syntax

log = logging.getLogger(__name__)

# JPEG 2000 (lossless, lossy) and High-Throughput JPEG 2000 (lossless, RPCL lossless, lossy).
J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)


def reduce_level(rows: int, cols: int, keep: int, levels: int) -> int:
    """The most resolution levels to drop while the longest side stays ≥ ``keep`` (and no
    more than the codestream has)."""
    longest, level = max(rows, cols), 0
    while level < levels and -(-longest // 2 ** (level + 1)) >= keep:
        level += 1
    return level


@functools.cache
def _scratch_dir() -> str | None:
    """Where the codestream is written for glymur (which reads files): memory (/dev/shm)
    where there is one, so pixel data never reaches a disk unencrypted."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def decode_reduced(ds: Dataset, index: int, frames: int, keep: int) -> np.ndarray | None:
    """Frame ``index`` of a grayscale JPEG 2000 image at the smallest resolution level whose
    longest side is still ≥ ``keep``; None when that is full size, when the image is not
    one this path handles (colour, palette, a codestream that disagrees with the data set's
    size, bit depth or sign), or when anything goes wrong (the caller decodes in full)."""
    if transfer_syntax(ds) not in J2K_SYNTAXES:
        return None
    try:
        return _decode_reduced(ds, index, frames, keep)
    except Exception as exc:  # noqa: BLE001 - the full decode reports the file's real problem
        log.debug("reduced JPEG 2000 decode not used: %s: %s", type(exc).__name__, exc)
        return None


def _decode_reduced(ds: Dataset, index: int, frames: int, keep: int) -> np.ndarray | None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    if str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if reduce_level(rows, cols, keep, levels=32) == 0:
        return None  # not even one level to drop: no need to look at the codestream
    frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    # A private file (0600) for this one read, removed at once.
    fd, name = tempfile.mkstemp(prefix="medtriage-j2k-", suffix=".j2k", dir=_scratch_dir())
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(frame)
        return _read(Path(name), ds, rows, cols, keep)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _read(path: Path, ds: Dataset, rows: int, cols: int, keep: int) -> np.ndarray | None:
    glymur = _glymur()
    if glymur is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glymur warns about odd but readable codestreams
        jp2 = glymur.Jp2k(str(path))
        segments = {s.marker_id: s for s in jp2.codestream.segment}
        siz, cod = segments["SIZ"], segments["COD"]
        bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0) or 0) == 1
        if (
            (int(siz.ysiz) - int(siz.yosiz), int(siz.xsiz) - int(siz.xosiz)) != (rows, cols)
            or len(siz.bitdepth) != 1
            or int(siz.bitdepth[0]) != bits
            or bool(siz.signed[0]) != signed
        ):
            return None  # pydicom's full decode knows how to reconcile these
        level = reduce_level(rows, cols, keep, levels=int(cod.num_res))
        if level == 0:
            return None
        step = 2**level
        arr = np.asarray(jp2[::step, ::step])
    if arr.shape != (-(-rows // step), -(-cols // step)):
        return None
    return arr


@functools.cache
def _glymur() -> Any:
    """glymur with the system's libopenjp2, or None (said once) when either is missing."""
    try:
        import glymur
        from glymur.lib import openjp2

        if openjp2.OPENJP2 is None:
            raise ImportError("libopenjp2 not found")
        return glymur
    except ImportError as exc:
        log.warning("JPEG 2000 is decoded at full size: %s", exc)
        return None
