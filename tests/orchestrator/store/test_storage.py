"""Object stores: the local directory, and S3 through a real S3 API server (moto server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from orchestrator.errors import ObjectNotFound
from orchestrator.store.encryption import (
    SEGMENT_BYTES,
    KeyRing,
    ObjectTampered,
    new_key_entry,
    open_sealed,
    seal_stream,
)
from orchestrator.store.objects import LocalStore, ObjectStore, S3Store, open_store

MOTO_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _roundtrip(store: ObjectStore) -> None:
    store.put("tenants/t/studies/s/originals/i.dcm", b"DICM-bytes")
    assert store.exists("tenants/t/studies/s/originals/i.dcm")
    assert store.get("tenants/t/studies/s/originals/i.dcm") == b"DICM-bytes"
    store.delete("tenants/t/studies/s/originals/i.dcm")
    assert not store.exists("tenants/t/studies/s/originals/i.dcm")
    with pytest.raises(ObjectNotFound):
        store.get("tenants/t/studies/s/originals/i.dcm")
    store.ping()


def test_local_store_roundtrip(tmp_path: Path) -> None:
    _roundtrip(open_store(f"file://{tmp_path}"))


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/outside", ".", ""])
def test_local_store_refuses_keys_that_escape(tmp_path: Path, key: str) -> None:
    with pytest.raises(Exception, match="escapes"):
        LocalStore(tmp_path / "store").put(key, b"x")
    assert not (tmp_path / "outside").exists()


@pytest.mark.integration
def test_s3_store_roundtrip_with_server_side_encryption(s3_endpoint: str) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket="medtriage-test"
    )
    store = open_store("s3://medtriage-test/prefix", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store)
    _roundtrip(store)
    store.put("k", b"v")
    head = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").head_object(
        Bucket="medtriage-test", Key="prefix/k"
    )
    assert head["ServerSideEncryption"] == "AES256"


# Streaming puts (large originals are never held whole in memory).
SEGMENT = 64


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize(
    "length",
    [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 5],
    ids=["empty", "one", "seg-1", "seg", "seg+1", "3seg", "3seg+5"],
)
def test_segmented_seal_roundtrip(length: int) -> None:
    ring = KeyRing.parse(new_key_entry("k1"))
    data = os.urandom(length)
    blob = b"".join(seal_stream(ring, "obj", _chunks(data, 7), segment_bytes=SEGMENT))
    assert blob.startswith(b"MTE2")
    assert open_sealed(ring, "obj", blob) == data


def test_segmented_seal_detects_reordering_truncation_and_moves() -> None:
    ring = KeyRing.parse(new_key_entry("k1"))
    data = os.urandom(3 * SEGMENT + 5)
    parts = list(seal_stream(ring, "obj", [data], segment_bytes=SEGMENT))
    header, segments = parts[0], parts[1:]
    assert len(segments) == 4
    swapped = header + segments[1] + segments[0] + b"".join(segments[2:])
    dropped_last = header + b"".join(segments[:-1])
    dropped_middle = header + segments[0] + b"".join(segments[2:])
    flipped = bytearray(header + b"".join(segments))
    flipped[-1] ^= 1
    for bad in (swapped, dropped_last, dropped_middle, bytes(flipped), header):
        with pytest.raises(ObjectTampered):
            open_sealed(ring, "obj", bad)
    with pytest.raises(ObjectTampered):
        open_sealed(ring, "other-key", header + b"".join(segments))


def test_encrypted_local_store_put_stream(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'objects'}")
    data = os.urandom(3 * SEGMENT_BYTES + 123)
    store.put_stream("a/b.dcm", _chunks(data, 65536))
    raw = (tmp_path / "objects" / "a" / "b.dcm").read_bytes()
    assert raw.startswith(b"MTE2") and data[:64] not in raw
    assert store.get("a/b.dcm") == data
    # Objects written whole before streaming existed still open.
    store.put("a/c.dcm", b"small")
    assert store.get("a/c.dcm") == b"small"


@pytest.mark.integration
def test_s3_put_stream_multipart_with_sse_and_encryption(s3_endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="medtriage-stream")
    plain = open_store("s3://medtriage-stream/p", endpoint_url=s3_endpoint)
    data = os.urandom(12 * 1024 * 1024)  # over boto3's 8 MB multipart threshold
    plain.put_stream("big", _chunks(data, 1 << 20))
    assert plain.get("big") == data
    assert client.head_object(Bucket="medtriage-stream", Key="p/big")["ServerSideEncryption"] == (
        "AES256"
    )
    sealed = open_store(
        "s3://medtriage-stream/e", endpoint_url=s3_endpoint, encryption_keys=new_key_entry("s3k")
    )
    sealed.put_stream("big", _chunks(data, 1 << 20))
    assert sealed.get("big") == data
