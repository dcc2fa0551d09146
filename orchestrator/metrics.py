"""Every Prometheus metric of the orchestrator, declared here and nowhere else.

Label values come from fixed sets (route templates, status codes, stage, model, version,
arm, outcome, the model's own class labels): never study, patient or file identifiers.
``LABEL_VALUES`` writes the sets down; ``tests/orchestrator/test_metrics.py`` scrapes the
running stack and fails on any value outside them.

Process model: the API exports these from its own ``/metrics`` route. Workers are separate
``SimpleWorker`` processes (possibly on other hosts), so each worker process serves its own
registry on its own port (``serve_worker_metrics``), and Prometheus scrapes every worker.
We chose this over prometheus_client's multiprocess mode because that mode needs one shared
directory on one host and a collector process beside it, loses gauges' meaning across
restarts and cannot span the several worker hosts of the production deployment; one
endpoint per process is the Prometheus-native model and ``sum()`` aggregates in queries.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Pipeline stages can wait minutes in a backlog; extend the tail.
STAGE_BUCKETS_S = (*LATENCY_BUCKETS_S, 120.0, 300.0, 600.0)
# Images per Triton request: bounded by the models' max_batch_size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Top-class confidence of a two-class softmax lies in [0.5, 1]; 0.025 steps over [0.5, 1.0]
# are the 20 bins of the reference histograms committed with each model version.
CONFIDENCE_BUCKETS = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))
UPLOAD_BYTES_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)

# The fixed label sets. Route templates and status codes are bounded by the app itself;
# model names, versions and class labels by the model repository.
STAGES = (
    "store",
    "queue_wait",
    "fetch",
    "preprocess",
    "triage",
    "analysis",
    "report",
    "delivery",
    "total_worker",
)
ARMS = ("live", "shadow")
STUDY_OUTCOMES = ("done", "needs_review", "failed", "not_applicable")
IMAGE_OUTCOMES = ("done", "failed", "not_applicable")
UPLOAD_OUTCOMES = ("accepted", "duplicate", "rejected")
INGEST_PATHS = ("rest", "stow", "dimse", "import")
# Refused instances that contradict what is stored (orchestrator/ingest/core.py).
INGEST_CONFLICT_KINDS = ("patient_mismatch", "instance_conflict")
INFERENCE_ERRORS = ("unavailable", "timeout", "invalid_output", "error")
WEBHOOK_OUTCOMES = ("delivered", "retry", "dead")
REVIEW_FIGURES = ("accuracy", "sensitivity", "specificity")
# How a supervised worker child ended before it was started again (supervisor.py).
CHILD_EXITS = ("signal", "error", "clean")
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "arm": ARMS,
    "ingest_path": INGEST_PATHS,
    "conflict": INGEST_CONFLICT_KINDS,
    "error": INFERENCE_ERRORS,
    "role": ("uploader", "reviewer", "ml-engineer", "sre", "admin"),
    "delivery_outcome": WEBHOOK_OUTCOMES,
    "figure": REVIEW_FIGURES,
    "exit": CHILD_EXITS,
}

# --- API -------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "medtriage_http_requests_total",
    "API requests by route template and status.",
    ["route", "status"],
)
HTTP_LATENCY = Histogram(
    "medtriage_http_request_duration_seconds",
    "API request latency by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS_S,
)
# Alert on any increase: someone used emergency access (orchestrator/security/breakglass.py).
BREAK_GLASS_GRANTS = Counter(
    "medtriage_break_glass_grants_total",
    "Break-glass (emergency access) grants by granted role.",
    ["role"],
)
UPLOAD_FILES = Counter(
    "medtriage_upload_files_total",
    "Uploaded files by ingest path and per-file outcome.",
    ["ingest_path", "outcome"],
)
UPLOAD_BYTES = Counter(
    "medtriage_upload_bytes_total",
    "Uploaded bytes by ingest path and per-file outcome.",
    ["ingest_path", "outcome"],
)
INGEST_CONFLICTS = Counter(
    "medtriage_ingest_conflicts_total",
    "Instances refused for contradicting what is stored: another patient's instance in a"
    " study (patient_mismatch), a stored SOPInstanceUID with other content"
    " (instance_conflict).",
    ["ingest_path", "conflict"],
)

# --- Pipeline (workers) ----------------------------------------------------------------
STUDIES = Counter(
    "medtriage_studies_processed_total", "Studies finished by a worker, by outcome.", ["outcome"]
)
IMAGES = Counter(
    "medtriage_images_processed_total", "Images finished by a worker, by outcome.", ["outcome"]
)
STAGE_LATENCY = Histogram(
    "medtriage_stage_duration_seconds",
    "Time one study spent in each pipeline stage.",
    ["stage"],
    buckets=STAGE_BUCKETS_S,
)
JOBS_IN_FLIGHT = Gauge("medtriage_jobs_in_flight", "Study jobs running in this worker process.")
JOB_RETRIES = Counter(
    "medtriage_job_retries_total", "Study job attempts after the first (retries)."
)
WORKER_RESTARTS = Counter(
    "medtriage_worker_restarts_total",
    "Worker processes started again by `medtriage worker`'s supervisor, by how the previous"
    " one ended (killed by a signal, exited with an error, exited cleanly unasked).",
    ["exit"],
)
WORKER_PROCESSES = Gauge(
    "medtriage_worker_processes",
    "Worker processes a supervisor keeps running now (configured: MEDTRIAGE_CONCURRENCY).",
)
DEAD_LETTERS = Counter(
    "medtriage_dead_letters_total",
    "Study jobs given up on after their last attempt (moved to the dead-letter set).",
)

# --- Inference ---------------------------------------------------------------------------
INFERENCE_LATENCY = Histogram(
    "medtriage_inference_duration_seconds",
    "Triton call latency (one batch) by model, version and arm.",
    ["model", "version", "arm"],
    buckets=LATENCY_BUCKETS_S,
)
INFERENCE_ERRORS_TOTAL = Counter(
    "medtriage_inference_errors_total",
    "Failed Triton calls by model, version, arm and kind.",
    ["model", "version", "arm", "error"],
)
INFERENCE_BATCH = Histogram(
    "medtriage_inference_batch_size",
    "Images per Triton request by model.",
    ["model"],
    buckets=BATCH_BUCKETS,
)

# --- What the models said ------------------------------------------------------------------
CONFIDENCE = Histogram(
    "medtriage_model_confidence",
    "Top-class confidence per image by model, version and arm.",
    ["model", "version", "arm"],
    buckets=CONFIDENCE_BUCKETS,
)
PREDICTIONS = Counter(
    "medtriage_model_predictions_total",
    "Predicted top class per image by model, version and arm.",
    ["model", "version", "arm", "label"],
)
REVIEW_STUDIES = Counter(
    "medtriage_review_studies_total", "Studies the confidence gate sent to review."
)
REVIEWED_PERFORMANCE = Gauge(
    "medtriage_model_reviewed_performance",
    "Accuracy, sensitivity and specificity of a model version against clinicians' verdicts"
    " (every reviewed case; refreshed by the API on each verdict and stats read).",
    ["model", "version", "figure"],
)

# --- Delivery ------------------------------------------------------------------------------
WEBHOOK_DELIVERIES = Counter(
    "medtriage_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (delivered; failed and to be retried; dead).",
    ["delivery_outcome"],
)


def observe_ingest_conflict(ingest_path: str, conflict: str) -> None:
    INGEST_CONFLICTS.labels(ingest_path, conflict).inc()


def observe_upload(ingest_path: str, outcome: str, size_bytes: int) -> None:
    UPLOAD_FILES.labels(ingest_path, outcome).inc()
    UPLOAD_BYTES.labels(ingest_path, outcome).inc(size_bytes)


def observe_study(
    outcome: str,
    timings_ms: Mapping[str, float],
    images_done: int,
    images_failed: int,
    images_not_applicable: int = 0,
) -> None:
    """One finished study: outcome, images, and every known stage it timed."""
    STUDIES.labels(outcome).inc()
    IMAGES.labels("done").inc(images_done)
    IMAGES.labels("failed").inc(images_failed)
    IMAGES.labels("not_applicable").inc(images_not_applicable)
    for stage, ms in timings_ms.items():
        if stage in STAGES:
            STAGE_LATENCY.labels(stage).observe(ms / 1e3)
    if outcome == "needs_review":
        REVIEW_STUDIES.inc()


def observe_inference(model: str, version: int, arm: str, seconds: float, batch: int) -> None:
    INFERENCE_LATENCY.labels(model, str(version), arm).observe(seconds)
    INFERENCE_BATCH.labels(model).observe(batch)


def inference_error(model: str, version: int, arm: str, exc: Exception) -> None:
    from orchestrator.errors import InferenceTimeout, InvalidOutput, ModelUnavailable

    kind = (
        "unavailable"
        if isinstance(exc, ModelUnavailable)
        else "timeout"
        if isinstance(exc, InferenceTimeout)
        else "invalid_output"
        if isinstance(exc, InvalidOutput)
        else "error"
    )
    INFERENCE_ERRORS_TOTAL.labels(model, str(version), arm, kind).inc()


def observe_prediction(model: str, version: int, arm: str, label: str, confidence: float) -> None:
    CONFIDENCE.labels(model, str(version), arm).observe(confidence)
    PREDICTIONS.labels(model, str(version), arm, label).inc()


def serve_worker_metrics(port: int, span: int, address: str) -> int | None:
    """Serve this process's metrics on the first free port of ``[port, port + span)``.

    Returns the bound port, or None when ``port`` is 0 (off) or every port is taken (the
    worker still runs; a warning says why it cannot be scraped).
    """
    if port == 0:
        return None
    for candidate in range(port, port + max(1, span)):
        try:
            start_http_server(candidate, addr=address)
        except OSError:
            continue
        return candidate
    log.warning("no free worker metrics port in %d..%d", port, port + span - 1)
    return None


def endpoints_key(queue_prefix: str) -> str:
    """Redis hash of live worker metrics endpoints (worker name -> host:port)."""
    return f"{queue_prefix}:metrics-endpoints"


def advertised_host(address: str) -> str:
    return socket.gethostname() if address in ("0.0.0.0", "::", "") else address


# A process's endpoint is announced again this often: Redis keeps nothing on disk, so after a
# restart the endpoint is listed again (and scraped) within this, not at the process's restart.
ANNOUNCE_INTERVAL_S = 5.0
# An announcement counts this long; a process killed without withdrawing its endpoint drops
# out of the targets after it.
ENDPOINT_TTL_S = 3 * ANNOUNCE_INTERVAL_S


def endpoint_alive_key(queue_prefix: str, worker: str) -> str:
    return f"{queue_prefix}:metrics-alive:{worker}"


def register_endpoint(redis: Any, queue_prefix: str, worker: str, host: str, port: int) -> None:
    """Announce a worker's endpoint for ENDPOINT_TTL_S; the API serves the announced set as
    Prometheus HTTP SD targets."""
    with redis.pipeline() as pipe:
        pipe.hset(endpoints_key(queue_prefix), worker, f"{host}:{port}")
        pipe.set(endpoint_alive_key(queue_prefix, worker), "1", ex=int(ENDPOINT_TTL_S))
        pipe.execute()


def unregister_endpoint(redis: Any, queue_prefix: str, worker: str) -> None:
    with redis.pipeline() as pipe:
        pipe.hdel(endpoints_key(queue_prefix), worker)
        pipe.delete(endpoint_alive_key(queue_prefix, worker))
        pipe.execute()


def announced_endpoints(redis: Any, queue_prefix: str) -> list[str]:
    """host:port of every endpoint announced within ENDPOINT_TTL_S."""
    raw = redis.hgetall(endpoints_key(queue_prefix))
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in raw]
    fresh = redis.mget([endpoint_alive_key(queue_prefix, n) for n in names]) if names else []
    return sorted(
        v.decode() if isinstance(v, bytes) else str(v)
        for v, alive in zip(raw.values(), fresh, strict=True)
        if alive is not None
    )


class Announcer(threading.Thread):
    """Keeps one process's metrics endpoint in the Redis hash behind ``/metrics/targets``."""

    def __init__(
        self,
        redis: Any,
        queue_prefix: str,
        name: str,
        host: str,
        port: int,
        interval_s: float = ANNOUNCE_INTERVAL_S,
    ) -> None:
        super().__init__(name="medtriage-metrics-announcer", daemon=True)
        self.redis = redis
        self.args = (queue_prefix, name, host, port)
        self.interval_s = interval_s
        self.stopping = threading.Event()

    def announce(self) -> None:
        try:
            register_endpoint(self.redis, *self.args)
        except RedisError as exc:
            log.warning("metrics endpoint not announced: %s", type(exc).__name__)

    def run(self) -> None:
        while True:
            self.announce()
            if self.stopping.wait(self.interval_s):
                return

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(RedisError):
            unregister_endpoint(self.redis, self.args[0], self.args[1])
