"""Backpressure for uploads: refuse new work (503 + Retry-After) while the queue is too deep
or its oldest job has waited too long. Refusing happens before anything is stored, so an
accepted upload is never dropped; clients retry after the advertised delay.

The queue figures are read from Redis at most once per ``SAMPLE_TTL_S`` per process, so a
burst of uploads costs one Redis round trip, not one per request.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from orchestrator.errors import DependencyUnavailable
from orchestrator.queue import jobs as jobqueue

# How long one reading of the queue's depth and age is reused.
SAMPLE_TTL_S = 1.0
# Retry-After bounds: at least this, at most that, else the oldest job's excess age.
RETRY_AFTER_MIN_S = 5
RETRY_AFTER_MAX_S = 120


class Overloaded(DependencyUnavailable):
    """The queue is past its limits: 503 with a Retry-After the client should honour."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__("queue", message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


@dataclass
class _Sample:
    at: float
    depth: int
    age_s: float


class Gate:
    def __init__(self, max_depth: int, max_age_s: float) -> None:
        self.max_depth = max_depth
        self.max_age_s = max_age_s
        self._sample: _Sample | None = None
        self._lock = threading.Lock()

    def _read(self, redis: Redis, queue_name: str) -> _Sample:
        now = time.monotonic()
        with self._lock:
            if self._sample is not None and now - self._sample.at < SAMPLE_TTL_S:
                return self._sample
        try:
            sample = _Sample(
                now,
                jobqueue.queue_depth(redis, queue_name),
                jobqueue.oldest_queued_age_s(redis, queue_name),
            )
        except RedisError as exc:
            raise DependencyUnavailable("redis", type(exc).__name__) from exc
        with self._lock:
            self._sample = sample
        return sample

    def check(self, redis: Redis, queue_name: str) -> None:
        """Raise Overloaded when either limit is passed (a limit of 0 is off)."""
        if self.max_depth <= 0 and self.max_age_s <= 0:
            return
        sample = self._read(redis, queue_name)
        if self.max_depth > 0 and sample.depth >= self.max_depth:
            raise Overloaded(
                f"{sample.depth} studies waiting (limit {self.max_depth}); retry later",
                RETRY_AFTER_MIN_S,
            )
        if self.max_age_s > 0 and sample.age_s >= self.max_age_s:
            excess = math.ceil(sample.age_s - self.max_age_s)
            raise Overloaded(
                f"oldest study has waited {sample.age_s:.0f}s (limit {self.max_age_s:.0f}s);"
                " retry later",
                min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, excess)),
            )


def check_upload(
    app_state: object, redis: Redis, queue_name: str, max_depth: int, max_age_s: float
) -> None:
    """The upload routes' hook: one Gate per app, made on first use."""
    gate = getattr(app_state, "backpressure", None)
    if gate is None:
        gate = Gate(max_depth, max_age_s)
        setattr(app_state, "backpressure", gate)  # noqa: B010 - app.state is dynamic
    gate.check(redis, queue_name)
