"""A real Prometheus (the Debian binary) scrapes the real local stack: the API, the worker's
own endpoint (found through the API's HTTP service discovery) and Triton, and answers a
query for each of our metric families."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from pydicom.uid import generate_uid

from orchestrator.cli.stack import free_port
from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

# The first sample arrives ~5 s after start; poll up to this long for all answers.
ANSWER_TIMEOUT_S = 60.0
POLL_S = 0.5
STOP_TIMEOUT_S = 10.0
STUDY_WAIT_S = 120.0
# One query per metric family we export (series that exist once a study has run).
FAMILY_QUERIES = {
    "http requests": 'medtriage_http_requests_total{job="medtriage-api"}',
    "http latency": "medtriage_http_request_duration_seconds_bucket",
    "uploads": 'medtriage_upload_files_total{ingest_path="rest"}',
    "upload bytes": "medtriage_upload_bytes_total",
    "queue depth": 'medtriage_queue_depth{queue="studies"}',
    "oldest job": "medtriage_queue_oldest_job_age_seconds",
    "started jobs": "medtriage_queue_started_jobs",
    "dead letters (registry)": "medtriage_queue_failed_jobs",
    "workers": "medtriage_queue_workers",
    "redis up": "medtriage_redis_up == 1",
    "database up": "medtriage_database_up == 1",
    "drift window": "medtriage_model_drift_window",
    "studies": 'medtriage_studies_processed_total{job="medtriage-worker"}',
    "images": "medtriage_images_processed_total",
    "stage latency": 'medtriage_stage_duration_seconds_count{stage="triage"}',
    "in flight": "medtriage_jobs_in_flight",
    "retries": "medtriage_job_retries_total",
    "dead letters": "medtriage_dead_letters_total",
    "inference latency": 'medtriage_inference_duration_seconds_count{arm="live"}',
    "batch size": "medtriage_inference_batch_size_count",
    "confidence": 'medtriage_model_confidence_bucket{model="triage"}',
    "predictions": "medtriage_model_predictions_total",
    "review studies": "medtriage_review_studies_total",
    "triton": 'nv_inference_count{job="triton"}',
    "api up": 'up{job="medtriage-api"} == 1',
    "worker up": 'up{job="medtriage-worker"} == 1',
    "triton up": 'up{job="triton"} == 1',
}


def _hostport(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname}:{parsed.port}"


@pytest.fixture(scope="module")
def prometheus(stack: Any, triton: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: apt-get install --no-install-recommends prometheus"
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "medtriage-api",
                "static_configs": [{"targets": [_hostport(stack.api_url)]}],
            },
            {
                "job_name": "medtriage-worker",
                "http_sd_configs": [
                    {"url": f"{stack.api_url}/metrics/targets", "refresh_interval": "1s"}
                ],
            },
            {
                "job_name": "triton",
                "static_configs": [{"targets": [_hostport(triton.metrics_url)]}],
            },
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run_study(api_url: str, key: str) -> None:
    client = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    pixels, _ = load_samples()
    uid = generate_uid()
    files = [
        (
            "files",
            (
                f"i{i}.dcm",
                radiograph(pixels[i], study_uid=uid, instance_number=i),
                "application/dicom",
            ),
        )
        for i in range(2)
    ]
    study_id = client.post("/v1/studies", files=files).json()["id"]
    deadline = time.monotonic() + STUDY_WAIT_S
    while client.get(f"/v1/studies/{study_id}").json()["status"] not in {
        "done",
        "needs_review",
        "failed",
    }:
        assert time.monotonic() < deadline, "study did not finish"
        time.sleep(0.2)


def test_prometheus_answers_every_family(prometheus: str, stack: Any, make_key: Any) -> None:
    _run_study(stack.api_url, make_key("uploader"))
    pending = dict(FAMILY_QUERIES)
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for name, query in list(pending.items()):
            try:
                body = httpx.get(
                    f"{prometheus}/api/v1/query", params={"query": query}, timeout=5
                ).json()
            except httpx.HTTPError:
                break  # not listening yet
            if body.get("status") == "success" and body["data"]["result"]:
                del pending[name]
        time.sleep(POLL_S)
    assert pending == {}, f"no answer for {sorted(pending)}"
    # The worker target came from the API's HTTP SD, with its own labels.
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    jobs = {t["labels"]["job"]: t["health"] for t in targets}
    assert jobs == {"medtriage-api": "up", "medtriage-worker": "up", "triton": "up"}


def test_an_unknown_metric_gets_no_answer(prometheus: str) -> None:
    """The poll above can fail: a name nobody exports has an empty result."""
    body = httpx.get(
        f"{prometheus}/api/v1/query", params={"query": "medtriage_no_such_metric_total"}, timeout=5
    ).json()
    assert body["status"] == "success" and body["data"]["result"] == []
