"""The nastiest inputs of benchmarks/malformed.py, at CI speed, through the REST upload and
STOW-RS paths of the real stack: deflate bombs, a header followed by megabytes of zero-length
elements, sequences nested thousands deep, declared giant images and frame counts, nonsense
image attributes, unknown transfer syntaxes, a corrupt VR, truncations, RLE data that makes
the codec panic, non-DICOM bytes. Each answer is 2xx or 4xx (never 5xx) within 5 s, the API
and the worker stay up, and every accepted study reaches a terminal state."""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from typing import Any

import httpx
import psutil
import psycopg
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from orchestrator.ingest import archive
from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

ANSWER_LIMIT_S = 5.0
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
IMPORT_LIMIT_S = 120.0
# The import process without a bomb inflated is ~150 MiB; a deflate bomb read whole is > 512 MiB.
IMPORT_RSS_LIMIT_MIB = 400.0
# A zip member that inflates to this while its headers say 1000 bytes.
LYING_ZIP_BYTES = 512 * 1024 * 1024
# Past the reader's 128 MiB inflation limit, cheap to compress.
DEFLATE_BOMB_BYTES = 512 * 1024 * 1024
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_BOUNDARY = "malformed-test-boundary"


def _dataset(**tags: Any) -> pydicom.Dataset:
    images, _ = load_samples()
    ds = pydicom.dcmread(io.BytesIO(radiograph(images[0], study_uid=generate_uid(), size=256)))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: pydicom.Dataset, *, implicit: bool = False) -> bytes:
    buf = io.BytesIO()
    if implicit:
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _rle(ds: pydicom.Dataset, pixels: bytes | None = None) -> bytes:
    if pixels is None:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([pixels])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return _save(ds)


def _with_syntax(raw: bytes, uid: str) -> bytes:
    """``raw`` with (0002,0010) rewritten in place of its old value and (0002,0000) fixed."""
    old = pydicom.dcmread(io.BytesIO(raw)).file_meta.TransferSyntaxUID
    old_value = old.encode() + b"\0" * (len(old) % 2)
    new_value = uid.encode() + b"\0" * (len(uid) % 2)
    at = raw.index(b"\x02\x00\x10\x00UI")
    out = raw[:at] + raw[at : at + 6] + struct.pack("<H", len(new_value)) + new_value
    out += raw[at + 8 + len(old_value) :]
    group_length = struct.unpack_from("<I", raw, 140)[0] + len(new_value) - len(old_value)
    return out[:140] + struct.pack("<I", group_length) + out[144:]


def _nested(depth: int, closed: bool = True) -> bytes:
    raw = _save(_dataset())
    at = raw.rindex(_PIXEL_TAG)
    sq, item = b"\x40\x00\x30\xa7SQ\0\0\xff\xff\xff\xff", b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    end = b"\xfe\xff\x0d\xe0\0\0\0\0\xfe\xff\xdd\xe0\0\0\0\0"
    return raw[:at] + (sq + item) * depth + (end * depth if closed else b"") + raw[at:]


def _deflated(body: bytes, zeros: int) -> bytes:
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    raw = _save(ds)
    meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [co.compress(body)]
    chunk = bytes(1 << 22)
    parts += [co.compress(chunk) for _ in range(zeros // len(chunk))]
    return raw[:meta_end] + b"".join(parts) + co.flush()


def _lying_zip(inflated: int) -> bytes:
    """One deflated member of ``inflated`` zero bytes whose headers say it holds 1000."""
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("bomb.dcm", "w", force_zip64=True) as member,
    ):
        chunk = bytes(1 << 22)
        for _ in range(inflated // len(chunk)):
            member.write(chunk)
    data = bytearray(buf.getvalue())
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        data[at + size_at : at + size_at + 4] = struct.pack("<I", 1000)
    return bytes(data)


def _inputs() -> dict[str, bytes]:
    good = _save(_dataset())
    pixel_at = good.rindex(_PIXEL_TAG)
    plain_body = good[144 + struct.unpack_from("<I", good, 140)[0] : pixel_at]
    bomb_pixels = _PIXEL_TAG + b"OW\0\0" + struct.pack("<I", 0x7FFFFFF0)
    rle = _rle(_dataset())
    rle_at = rle.rindex(_PIXEL_TAG)
    implicit = _dataset()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit_raw = _save(implicit, implicit=True)
    implicit_at = implicit_raw.rindex(_PIXEL_TAG)
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\0\0\0\0\xfe\xff\xdd\xe0\0\0\0\0"
    inputs = {
        "deflate-bomb-zeros": _deflated(b"", DEFLATE_BOMB_BYTES),
        "deflate-bomb-pixeldata": _deflated(plain_body + bomb_pixels, DEFLATE_BOMB_BYTES),
        "deflate-garbage": _deflated(b"", 0)[:-2] + bytes(range(256)) * 8,
        "zero-element-tail-8MiB": good[:pixel_at] + bytes(8 << 20),
        "nested-1000": _nested(1000),
        "nested-10000": _nested(10000),
        "nested-10000-unterminated": _nested(10000, closed=False),
        "nested-implicit-5000": implicit_raw[:implicit_at]
        + (b"\x40\x00\x30\xa7\xff\xff\xff\xff" + item) * 5000
        + item_end * 5000
        + implicit_raw[implicit_at:],
        "declared-65535x65535": _save(_dataset(Rows=65535, Columns=65535)),
        "declared-65535x65535-rle": _rle(_dataset(Rows=65535, Columns=65535), b"\0" * 64),
        "frames-1000000": _save(_dataset(NumberOfFrames=1_000_000)),
        "frames-2147483647-rle": _rle(_dataset(NumberOfFrames=2**31 - 1), b"\0" * 64),
        "bits-allocated-0": _save(_dataset(BitsAllocated=0)),
        "bits-allocated-13": _save(_dataset(BitsAllocated=13)),
        "bits-allocated-65535": _save(_dataset(BitsAllocated=65535)),
        "samples-0": _save(_dataset(SamplesPerPixel=0)),
        "samples-65535": _save(_dataset(SamplesPerPixel=65535)),
        "syntax-unknown": _with_syntax(good, "1.2.3.4.5.6.7"),
        "syntax-not-a-uid": _with_syntax(good, "hello, world"),
        "syntax-private": _with_syntax(good, "1.2.840.113619.5.2"),
        "syntax-empty": _with_syntax(good, ""),
        # BitsAllocated's VR 'US' turned into 'UW', which pydicom cannot convert.
        "unknown-vr": good.replace(b"\x28\x00\x00\x01US", b"\x28\x00\x00\x01UW", 1),
        "pixel-length-huge": good[: pixel_at + 8]
        + struct.pack("<I", 0x7FFFFFF0)
        + good[pixel_at + 12 :],
        "truncated-in-meta": good[:150],
        "truncated-in-pixels": good[: pixel_at + 200],
        "truncated-rle": rle[: (rle_at + len(rle)) // 2],
        # A byte in the RLE segment that makes the Rust RLE decoder panic.
        "rle-codec-panic": rle[: rle_at + 96] + b"\x81" + rle[rle_at + 97 :],
        # PostgreSQL text cannot hold NUL: refused, not a 500 from the INSERT.
        "uid-with-nul": _save(_dataset(StudyInstanceUID="1.2.826.0.1\x003680043.9")),
        "empty": b"",
        "text": b"not DICOM at all\n" * 50,
        "pdf": b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
    }
    assert len(set(inputs.values())) == len(inputs)
    return inputs


@pytest.fixture(scope="module")
def inputs() -> dict[str, bytes]:
    return _inputs()


def _send(client: httpx.Client, route: str, data: bytes) -> httpx.Response:
    if route == "rest":
        return client.post("/v1/studies", files=[("files", ("x.dcm", data, "application/dicom"))])
    body = f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
    body += f"\r\n--{_BOUNDARY}--\r\n".encode()
    return client.post(
        "/dicomweb/studies",
        params={"complete": "true"},
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}'
        },
    )


def _statuses(database_url: str, tenant: str) -> dict[str, str]:
    """StudyInstanceUID → status of every study of ``tenant`` (PostgreSQL is the truth)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT s.study_uid, s.status FROM studies s JOIN tenants t ON t.id = s.tenant_id"
            " WHERE t.name = %s",
            (tenant,),
        ).fetchall()
    return {str(uid): str(status) for uid, status in rows}


@pytest.mark.parametrize("route", ["rest", "stow"])
def test_nasty_inputs_are_answered_quickly_and_never_with_5xx(
    route: str, inputs: dict[str, bytes], stack: Any, make_key: Any, database_url: str
) -> None:
    tenant = f"tenant-malformed-{route}"
    key = make_key("uploader", tenant=tenant)
    answers: dict[str, tuple[int, float]] = {}
    accepted: list[str] = []
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        for name, data in inputs.items():
            started = time.perf_counter()
            response = _send(client, route, data)
            answers[name] = (response.status_code, time.perf_counter() - started)
            assert all(p.poll() is None for p in stack.procs), f"a process exited after {name}"
            if response.status_code < 300:
                accepted.append(name)
        server_errors = {n: a for n, a in answers.items() if a[0] >= 500}
        slow = {n: a for n, a in answers.items() if a[1] > ANSWER_LIMIT_S}
        assert not server_errors, server_errors
        assert not slow, slow
        assert all(200 <= code < 500 for code, _ in answers.values()), answers
        # The bombs are refused outright, not stored for a worker to choke on.
        for name in ("deflate-bomb-zeros", "deflate-bomb-pixeldata", "zero-element-tail-8MiB"):
            assert answers[name][0] >= 400, (name, answers[name])
    assert accepted, "some inputs (readable headers, bad pixels) are accepted"
    deadline = time.monotonic() + WAIT_S
    while True:
        status = _statuses(database_url, tenant)
        if all(s in TERMINAL for s in status.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status and all(s in TERMINAL for s in status.values()), status
    assert all(p.poll() is None for p in stack.procs)
    # The RLE data that makes the codec panic fails its study instead of leaving it stuck.
    panic = pydicom.dcmread(io.BytesIO(inputs["rle-codec-panic"]), stop_before_pixels=True)
    assert status[str(panic.StudyInstanceUID)] == "failed", status


def test_import_survives_the_nastiest_files(
    inputs: dict[str, bytes], stack: Any, settings_env: dict[str, str], tmp_path: Any
) -> None:
    """``medtriage import`` on a folder of them: a summary with every file (no traceback), the
    good file imported, no bomb inflated, done in bounded time (the deflate bombs used to be
    inflated whole while checking for duplicates, a NUL in a UID ended the whole import with a
    DataError, a zip of 20,001 members took minutes, and a zip member understating its size
    was inflated whole in memory)."""
    folder = tmp_path / "nasty"
    folder.mkdir()
    for i, (name, data) in enumerate(inputs.items()):
        (folder / f"{i:02d}-{name}.dcm").write_bytes(data)
    (folder / "good.dcm").write_bytes(_save(_dataset()))
    # More members than the API takes: refused whole (each member read reopens the archive,
    # so reading them all took minutes).
    with zipfile.ZipFile(folder / "many.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(archive.DEFAULT_MAX_MEMBERS + 1):
            zf.writestr(f"m{i}.dcm", b"x")
    (folder / "liar.zip").write_bytes(_lying_zip(LYING_ZIP_BYTES))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "import",
            str(folder),
            "--tenant",
            "tenant-malformed-import",
            "--quiet",
        ],
        env={**os.environ, **settings_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0.0
    while proc.poll() is None and time.perf_counter() - started < IMPORT_LIMIT_S:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss / 2**20)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 1, out + err  # 1: some files rejected; a traceback is also 1
    assert "Traceback" not in err, err
    m = re.search(r"imported (\d+), duplicate (\d+) \(already stored\), rejected (\d+)", out)
    assert m, out + err
    assert int(m[1]) + int(m[2]) + int(m[3]) == len(inputs) + 3, out
    assert "liar.zip/bomb.dcm: unreadable" in out, out
    assert "many.zip: 20001 members exceed the limit" in out, out
    assert int(m[1]) >= 1
    assert peak < IMPORT_RSS_LIMIT_MIB, peak
