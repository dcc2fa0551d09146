"""Metrics the API computes at scrape time: queue state from Redis, drift and quality per
model version from PostgreSQL (cached), plus the worker endpoints as Prometheus HTTP SD.

These live in a registry per app (not the process-global one), so several apps in one
process (tests) never collide; ``render`` joins both registries into one exposition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, StartedJobRegistry

from orchestrator import metrics as m
from orchestrator.api.deps import Services
from orchestrator.inference import drift
from orchestrator.inference.specs import load_repository

log = logging.getLogger(__name__)

QUEUE_LABEL = "studies"
# A scrape waits at most this long for a pooled connection before calling PostgreSQL down.
DB_PROBE_TIMEOUT_S = 2.0


class QueueCollector(Collector):
    """Depth, oldest job age, running and dead-lettered jobs of the study queue, read from
    Redis on every scrape (cheap: a few O(1) calls)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "medtriage_queue_depth", "Jobs waiting in the queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "medtriage_queue_oldest_job_age_seconds",
            "Age of the oldest waiting job (0 when empty).",
            labels=["queue"],
        )
        started = GaugeMetricFamily(
            "medtriage_queue_started_jobs", "Jobs being run by workers.", labels=["queue"]
        )
        failed = GaugeMetricFamily(
            "medtriage_queue_failed_jobs",
            "Jobs in the failed (dead-letter) registry.",
            labels=["queue"],
        )
        workers = GaugeMetricFamily(
            "medtriage_queue_workers", "Workers registered on the queue.", labels=["queue"]
        )
        up = GaugeMetricFamily("medtriage_redis_up", "1 when Redis answered this scrape.")
        db_up = GaugeMetricFamily(
            "medtriage_database_up", "1 when PostgreSQL answered this scrape."
        )
        try:
            with self._services.pool.connection(timeout=DB_PROBE_TIMEOUT_S) as conn:
                conn.execute("SELECT 1")
            db_up.add_metric([], 1.0)
        except Exception:  # noqa: BLE001 - any failure means "down" for this gauge
            db_up.add_metric([], 0.0)
        redis = self._services.redis
        try:
            queue = Queue(self._services.settings.queue_name, connection=redis)
            first = queue.get_job_ids(0, 1)
            age = 0.0
            if first:
                job = queue.fetch_job(first[0])
                if job is not None and job.enqueued_at is not None:
                    age = max(0.0, time.time() - job.enqueued_at.timestamp())
            depth.add_metric([QUEUE_LABEL], float(queue.count))
            oldest.add_metric([QUEUE_LABEL], age)
            started.add_metric([QUEUE_LABEL], float(StartedJobRegistry(queue=queue).count))
            failed.add_metric([QUEUE_LABEL], float(FailedJobRegistry(queue=queue).count))
            workers.add_metric([QUEUE_LABEL], float(Worker.count(queue=queue)))
            up.add_metric([], 1.0)
        except RedisError:
            up.add_metric([], 0.0)
        yield from (depth, oldest, started, failed, workers, up, db_up)


class DriftCollector(Collector):
    """Drift and quality gauges per model version, recomputed at most every
    ``drift_refresh_s`` (scrapes in between get the cached families)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._lock = threading.Lock()
        self._cached: list[GaugeMetricFamily] = []
        self._at = float("-inf")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._at >= self._services.settings.drift_refresh_s:
                try:
                    self._cached = self._compute()
                except Exception as exc:  # noqa: BLE001 - a scrape must not fail on the DB
                    log.warning("drift metrics not refreshed: %s", type(exc).__name__)
                self._at = time.monotonic()
            yield from self._cached

    def _compute(self) -> list[GaugeMetricFamily]:
        settings = self._services.settings
        labels = ["model", "version"]
        fams = {
            "psi": GaugeMetricFamily(
                "medtriage_model_drift_psi",
                "PSI of the live top-class confidence window against the version's reference.",
                labels=labels,
            ),
            "js": GaugeMetricFamily(
                "medtriage_model_drift_js_distance",
                "Jensen-Shannon distance (base 2) of the live window against the reference.",
                labels=labels,
            ),
            "window": GaugeMetricFamily(
                "medtriage_model_drift_window",
                "Live results in the drift window (0 = too few to report drift).",
                labels=labels,
            ),
            "review": GaugeMetricFamily(
                "medtriage_model_review_share",
                "Share of the version's recent studies sent to review.",
                labels=labels,
            ),
            "arms": GaugeMetricFamily(
                "medtriage_model_arm_agreement",
                "Share of images where this version and another arm (live vs shadow) agree.",
                labels=labels,
            ),
            "verdict": GaugeMetricFamily(
                "medtriage_model_review_agreement",
                "Share of closed reviews whose verdict agreed with the model.",
                labels=labels,
            ),
        }
        repository = load_repository(settings.model_repository)
        with self._services.pool.connection() as conn:
            for name, spec in sorted(repository.items()):
                for version in spec.versions:
                    key = [name, str(version)]
                    path = drift.reference_path(settings.model_repository, name, version)
                    live = drift.live_confidences(conn, name, version, settings.drift_window)
                    result = None
                    if path.exists():
                        result = drift.compare(name, version, drift.Reference.load(path), live)
                    fams["window"].add_metric(key, float(result.window if result else 0))
                    if result is not None:
                        fams["psi"].add_metric(key, result.psi)
                        fams["js"].add_metric(key, result.js)
                    q = drift.quality(conn, name, version, settings.drift_window)
                    for fam, value in (
                        ("review", q.review_share),
                        ("arms", q.arm_agreement),
                        ("verdict", q.review_agreement),
                    ):
                        if value is not None:
                            fams[fam].add_metric(key, value)
        return list(fams.values())


def build_registry(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(services))
    registry.register(DriftCollector(services))
    return registry


def render(registry: CollectorRegistry | None) -> bytes:
    """The process-global metrics followed by the app's scrape-time collectors."""
    body = generate_latest()
    return body + generate_latest(registry) if registry is not None else body


def worker_targets(services: Services) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery: the worker (and supervisor) metrics endpoints
    announced lately (metrics.Announcer re-announces them, e.g. after a Redis restart)."""
    try:
        targets = m.announced_endpoints(services.redis, services.settings.queue_prefix)
    except RedisError:
        return []
    return [{"targets": targets, "labels": {"job": "medtriage-worker"}}] if targets else []
