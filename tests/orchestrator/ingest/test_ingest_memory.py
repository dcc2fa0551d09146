"""A 300 MB multi-frame original through a real API process: spooled to disk, checked from
its header, hashed and streamed (encrypted) to the object store in pieces, so the API's peak
memory rises by less than 50 MB. No worker reads this API's queue (nothing decodes it)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from redis import Redis
from rq import Queue

from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

ROWS = COLS = 1024
FRAMES = 150  # 1024 x 1024 x 150 x 2 bytes = 300 MiB of pixel data
PEAK_RISE_LIMIT = 50 * 1024 * 1024
START_TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 300.0
_WRITE_CHUNK = 8 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _big_multiframe(path: Path) -> tuple[str, int]:
    """A header written by pydicom, then the pixel data element appended in pieces."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "SYNTHETIC-0001"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLS, FRAMES
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.save_as(path, enforce_file_format=True)
    length = ROWS * COLS * FRAMES * 2
    pattern = (bytes(range(256)) * (_WRITE_CHUNK // 256))[:_WRITE_CHUNK]
    with path.open("ab") as fh:
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        left = length
        while left:
            fh.write(pattern[: min(left, _WRITE_CHUNK)])
            left -= min(left, _WRITE_CHUNK)
    return str(ds.SOPInstanceUID), path.stat().st_size


@pytest.fixture
def api(settings_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    port = _free_port()
    prefix = f"mem-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "api"],
        env={
            **os.environ,
            **settings_env,
            "MEDTRIAGE_PORT": str(port),
            "MEDTRIAGE_QUEUE_PREFIX": prefix,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "API did not start"
        time.sleep(0.2)
    yield {"url": url, "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=30)
    Queue(
        f"{prefix}:studies", connection=Redis.from_url(settings_env["MEDTRIAGE_REDIS_URL"])
    ).delete(delete_jobs=True)


def test_300mb_original_is_streamed_not_held(
    api: dict[str, Any], make_key: Any, tmp_path: Path, database_url: str, storage_dir: Path
) -> None:
    source = tmp_path / "big.dcm"
    sop_uid, size = _big_multiframe(source)
    assert size > 300 * 1024 * 1024
    headers = {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-mem')}"}
    with httpx.Client(base_url=api["url"], headers=headers, timeout=UPLOAD_TIMEOUT_S) as client:
        # Warm up: the first upload loads modules and opens connections.
        images, _ = load_samples()
        warm = radiograph(images[0], study_uid=generate_uid(), size=64)
        r = client.post("/v1/studies", content=warm, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 202, r.text
        before = _peak_rss(api["pid"])
        with source.open("rb") as fh:
            r = client.post(
                "/v1/studies", content=fh, headers={"Content-Type": "application/dicom"}
            )
        after = _peak_rss(api["pid"])
    assert r.status_code == 202, r.text
    assert r.json()["files"][0]["outcome"] == "accepted"
    rise = after - before
    print(f"\npeak RSS before {before / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB")
    assert rise < PEAK_RISE_LIMIT, f"API peak memory rose by {rise / 2**20:.0f} MiB"

    sha = hashlib.sha256()
    with source.open("rb") as fh:
        while chunk := fh.read(_WRITE_CHUNK):
            sha.update(chunk)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT size_bytes, sha256, object_key, frames FROM instances WHERE sop_uid = %s",
            (sop_uid,),
        ).fetchone()
    assert row is not None
    assert (row[0], row[1], row[3]) == (size, sha.hexdigest(), FRAMES)
    stored = storage_dir / row[2]
    assert stored.read_bytes()[:4] == b"MTE2"  # sealed in segments, not whole
    stored.unlink()
    source.unlink()


def _related(path: Path, boundary: str) -> Iterator[bytes]:
    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with path.open("rb") as fh:
        while chunk := fh.read(_WRITE_CHUNK):
            yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_300mb_stow_part_is_streamed_not_held(
    api: dict[str, Any], make_key: Any, tmp_path: Path, database_url: str, storage_dir: Path
) -> None:
    source = tmp_path / "big.dcm"
    sop_uid, size = _big_multiframe(source)
    headers = {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-mem')}"}
    boundary = uuid.uuid4().hex
    with httpx.Client(base_url=api["url"], headers=headers, timeout=UPLOAD_TIMEOUT_S) as client:
        images, _ = load_samples()
        warm = radiograph(images[1], study_uid=generate_uid(), size=64)
        r = client.post("/v1/studies", content=warm, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 202, r.text
        before = _peak_rss(api["pid"])
        r = client.post(
            "/dicomweb/studies",
            content=_related(source, boundary),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            },
        )
        after = _peak_rss(api["pid"])
    assert r.status_code == 200, r.text
    rise = after - before
    print(f"\npeak RSS before {before / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB")
    assert rise < PEAK_RISE_LIMIT, f"API peak memory rose by {rise / 2**20:.0f} MiB"
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT size_bytes, object_key FROM instances WHERE sop_uid = %s", (sop_uid,)
        ).fetchone()
        # Not for the session's worker: this study only measured the API.
        conn.execute(
            "DELETE FROM study_arrivals WHERE study_id ="
            " (SELECT study_id FROM instances WHERE sop_uid = %s)",
            (sop_uid,),
        )
    assert row is not None and row[0] == size
    (storage_dir / row[1]).unlink()
    source.unlink()


def test_300mb_zip_member_is_inflated_to_disk_not_memory(
    api: dict[str, Any], make_key: Any, tmp_path: Path, database_url: str, storage_dir: Path
) -> None:
    source = tmp_path / "big.dcm"
    sop_uid, size = _big_multiframe(source)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.write(source, "STUDY/IM1")
    source.unlink()
    headers = {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-mem')}"}
    with httpx.Client(base_url=api["url"], headers=headers, timeout=UPLOAD_TIMEOUT_S) as client:
        images, _ = load_samples()
        warm = radiograph(images[2], study_uid=generate_uid(), size=64)
        r = client.post("/v1/studies", content=warm, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 202, r.text
        before = _peak_rss(api["pid"])
        with archive.open("rb") as fh:
            r = client.post("/v1/studies", content=fh, headers={"Content-Type": "application/zip"})
        after = _peak_rss(api["pid"])
    assert r.status_code == 202, r.text
    assert [f["outcome"] for f in r.json()["files"]] == ["accepted"]
    rise = after - before
    print(f"\npeak RSS before {before / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB")
    assert rise < PEAK_RISE_LIMIT, f"API peak memory rose by {rise / 2**20:.0f} MiB"
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT size_bytes, object_key FROM instances WHERE sop_uid = %s", (sop_uid,)
        ).fetchone()
    assert row is not None and row[0] == size
    (storage_dir / row[1]).unlink()
