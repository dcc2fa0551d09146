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
from orchestrator.storage import LocalStore, ObjectStore, S3Store, open_store

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


def test_local_store_refuses_keys_that_escape(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="escapes"):
        LocalStore(tmp_path).put("../outside", b"x")


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
