"""Metrics of the real stack: after a study runs through the API process, the worker process
and the real Triton, the API's /metrics and the worker's own endpoint (found through the
API's Prometheus HTTP SD route) export every family, with label values from fixed sets."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from orchestrator import metrics
from orchestrator.api.app import create_app, iter_routes
from orchestrator.inference.specs import load_repository
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT, ApiSettings

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
IMAGES = 3
UUID_RE = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)
DICOM_UID_RE = re.compile(r"^\d+(\.\d+){3,}$")

API_FAMILIES = {
    "medtriage_http_requests",
    "medtriage_http_request_duration_seconds",
    "medtriage_upload_files",
    "medtriage_upload_bytes",
    "medtriage_queue_depth",
    "medtriage_queue_oldest_job_age_seconds",
    "medtriage_queue_started_jobs",
    "medtriage_queue_failed_jobs",
    "medtriage_queue_workers",
    "medtriage_redis_up",
    "medtriage_database_up",
    "medtriage_model_drift_window",
}
WORKER_FAMILIES = {
    "medtriage_studies_processed",
    "medtriage_images_processed",
    "medtriage_stage_duration_seconds",
    "medtriage_jobs_in_flight",
    "medtriage_job_retries",
    "medtriage_dead_letters",
    "medtriage_inference_duration_seconds",
    "medtriage_inference_batch_size",
    "medtriage_model_confidence",
    "medtriage_model_predictions",
    "medtriage_review_studies",
}


def allowed_label_values() -> dict[str, set[str] | re.Pattern[str]]:
    """Every label name we export and the fixed set (or shape) its values come from."""
    repo = load_repository(REPO_ROOT / "model_repository")
    routes = {path for path, _ in iter_routes(create_app(ApiSettings()).routes)} | {"unmatched"}
    outcomes = {*metrics.STUDY_OUTCOMES, *metrics.IMAGE_OUTCOMES, *metrics.UPLOAD_OUTCOMES}
    return {
        "route": routes,
        "status": re.compile(r"^[1-5]\d\d$"),
        "le": re.compile(r"^([0-9.e+-]+|\+Inf)$"),
        "outcome": outcomes,
        "model": set(repo),
        "version": {str(v) for spec in repo.values() for v in spec.versions},
        "label": {label for spec in repo.values() for label in spec.labels},
        "queue": {"studies"},
        **{name: set(values) for name, values in metrics.LABEL_VALUES.items()},
    }


def check_labels(text: str) -> list[str]:
    """Problems with label values in an exposition (empty when every value is bounded)."""
    allowed = allowed_label_values()
    problems = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("medtriage_"):
            continue
        for sample in family.samples:
            for name, value in sample.labels.items():
                rule = allowed.get(name)
                if UUID_RE.search(value) or DICOM_UID_RE.match(value):
                    problems.append(f"{sample.name}{{{name}={value!r}}} is an identifier")
                elif rule is None:
                    problems.append(f"{sample.name}: label {name!r} has no fixed set")
                elif isinstance(rule, re.Pattern):
                    if not rule.match(value):
                        problems.append(f"{sample.name}{{{name}={value!r}}}")
                elif value not in rule:
                    problems.append(f"{sample.name}{{{name}={value!r}}} not in {sorted(rule)}")
    return problems


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def run_study(client: httpx.Client, images: int = IMAGES) -> dict[str, Any]:
    pixels, _ = load_samples()
    uid = generate_uid()
    files = [
        (
            "files",
            (
                f"img{i}.dcm",
                radiograph(pixels[i], study_uid=uid, instance_number=i),
                "application/dicom",
            ),
        )
        for i in range(images)
    ]
    response = client.post("/v1/studies", files=files)
    assert response.status_code == 202, response.text
    study_id = response.json()["id"]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        body = client.get(f"/v1/studies/{study_id}").json()
        if body["status"] in TERMINAL:
            return dict(body)
        time.sleep(0.2)
    raise AssertionError(f"study {study_id} not finished after {WAIT_S}s")


def worker_metrics_urls(api_url: str) -> list[str]:
    groups = httpx.get(f"{api_url}/metrics/targets", timeout=10).json()
    return [f"http://{t}/metrics" for g in groups for t in g["targets"]]


@pytest.fixture(scope="module")
def processed(stack: Any, make_key: Any) -> dict[str, Any]:
    client = httpx.Client(
        base_url=stack.api_url,
        headers={"Authorization": f"Bearer {make_key('uploader')}"},
        timeout=60,
    )
    study = run_study(client)
    api = httpx.get(f"{stack.api_url}/metrics", timeout=10).text
    urls = worker_metrics_urls(stack.api_url)
    workers = [httpx.get(url, timeout=10).text for url in urls]
    return {"study": study, "api": api, "workers": workers, "urls": urls}


def _value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    total = 0.0
    for family in fams.values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_every_family_is_exported(processed: dict[str, Any]) -> None:
    assert processed["study"]["status"] in ("done", "needs_review")
    assert len(processed["workers"]) == 1, processed["urls"]
    assert set(families(processed["api"])) >= API_FAMILIES, sorted(families(processed["api"]))
    worker = families(processed["workers"][0])
    assert set(worker) >= WORKER_FAMILIES, sorted(worker)


def test_values_follow_the_study(processed: dict[str, Any]) -> None:
    api = families(processed["api"])
    worker = families(processed["workers"][0])
    study = processed["study"]
    assert (
        _value(api, "medtriage_upload_files_total", ingest_path="rest", outcome="accepted")
        >= IMAGES
    )
    assert _value(api, "medtriage_upload_bytes_total", ingest_path="rest") > 0
    assert _value(api, "medtriage_http_requests_total", route="/v1/studies", status="202") >= 1
    assert _value(api, "medtriage_redis_up") == 1
    assert _value(api, "medtriage_queue_workers", queue="studies") == 1
    assert _value(worker, "medtriage_studies_processed_total", outcome=study["status"]) >= 1
    assert _value(worker, "medtriage_images_processed_total", outcome="done") >= IMAGES
    for stage in ("queue_wait", "fetch", "preprocess", "triage", "analysis", "report"):
        assert _value(worker, "medtriage_stage_duration_seconds_count", stage=stage) >= 1, stage
    # Each model's live version for this study (earlier tests may route the two differently).
    live = {r["model"]: str(r["version"]) for r in study["instances"][0]["results"]}
    for model in ("triage", "analysis"):
        version = live[model]
        assert (
            _value(
                worker, "medtriage_model_confidence_count", model=model, arm="live", version=version
            )
            >= IMAGES
        )
        assert _value(worker, "medtriage_inference_duration_seconds_count", model=model) >= 1
        assert _value(worker, "medtriage_inference_batch_size_sum", model=model) >= IMAGES
    predicted = sum(
        _value(worker, "medtriage_model_predictions_total", model="triage", label=label)
        for label in ("normal", "pneumonia")
    )
    assert predicted >= IMAGES
    assert _value(worker, "medtriage_jobs_in_flight") == 0


def test_label_values_are_bounded(processed: dict[str, Any]) -> None:
    for text in (processed["api"], *processed["workers"]):
        assert check_labels(text) == []


def test_label_check_catches_an_identifier() -> None:
    bad = (
        "# TYPE medtriage_x_total counter\n"
        'medtriage_x_total{route="/v1/studies/5d0c6d8e-1f3a-4b7e-9a41-0c2f3e4d5a6b"} 1\n'
        'medtriage_x_total{stage="1.2.840.113619.2.55.3"} 1\n'
        'medtriage_x_total{patient="x"} 1\n'
    )
    assert len(check_labels(bad)) == 3


def test_worker_metrics_port_range(tmp_path: Any) -> None:
    """A taken port is skipped; 0 turns the endpoint off."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        s.listen()
        assert metrics.serve_worker_metrics(0, 5, "127.0.0.1") is None
        port = metrics.serve_worker_metrics(taken, 20, "127.0.0.1")
    assert port is not None and port != taken
    assert "medtriage_jobs_in_flight" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
