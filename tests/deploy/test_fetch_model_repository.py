"""The chart's init container script (deploy/helm/medtriage/files/fetch_model_repository.py)
against a real S3 API server (moto): it copies an s3:// model repository into the pod so the
API and workers read the same versions Triton serves, and fails loudly on a wrong URL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from orchestrator.cli.stack import free_port
from orchestrator.inference.specs import load_repository
from orchestrator.settings import REPO_ROOT

pytestmark = pytest.mark.integration

SCRIPT = REPO_ROOT / "deploy" / "helm" / "medtriage" / "files" / "fetch_model_repository.py"
MODELS = REPO_ROOT / "model_repository"
BUCKET = "models"
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    client = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    )  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    for path in MODELS.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            client.upload_file(str(path), BUCKET, f"repo/{path.relative_to(MODELS)}")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _fetch(s3: str, url: str, dest: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MEDTRIAGE_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), url, str(dest)],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip


def test_copies_the_repository_the_platform_reads(s3: str, tmp_path: Path) -> None:
    ran = _fetch(s3, f"s3://{BUCKET}/repo", tmp_path / "models")
    assert ran.returncode == 0, ran.stderr[-2000:]
    expected = {
        p.relative_to(MODELS): p.read_bytes()
        for p in MODELS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    got = {
        p.relative_to(tmp_path / "models"): p.read_bytes()
        for p in (tmp_path / "models").rglob("*")
        if p.is_file()
    }
    assert got == expected
    assert load_repository(tmp_path / "models").keys() == load_repository(MODELS).keys()


@pytest.mark.parametrize(
    ("url", "message"),
    [("s3://models/nothing-here", "no objects under"), ("gs://models/repo", "not an s3://")],
    ids=["empty-prefix", "wrong-scheme"],
)
def test_a_wrong_url_fails_with_a_message(s3: str, tmp_path: Path, url: str, message: str) -> None:
    ran = _fetch(s3, url, tmp_path / "models")
    assert ran.returncode != 0
    assert message in ran.stderr
