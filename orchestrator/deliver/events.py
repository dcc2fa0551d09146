"""Study stage changes as events on Redis pub/sub, for the API's Server-Sent Events streams.

Workers publish each stage change of a study on two channels: the study's own (the
``/v1/studies/{id}/events`` stream) and its tenant's (the ``/v1/events`` feed). Channels and
payloads carry opaque ids only. Publishing is best-effort: pub/sub keeps nothing for a
client that is not listening, and a Redis hiccup must never fail a study; the streams send
the study's stored state first, so a late or reconnecting client still starts correct.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def study_channel(queue_prefix: str, study_id: Any) -> str:
    return f"{queue_prefix}:events:study:{study_id}"


def tenant_channel(queue_prefix: str, tenant_id: Any) -> str:
    return f"{queue_prefix}:events:tenant:{tenant_id}"


def payload(study_id: Any, stage: str, status: str) -> dict[str, Any]:
    return {"study_id": str(study_id), "stage": stage, "status": status, "at": time.time()}


class EventPublisher:
    def __init__(self, redis: Redis, queue_prefix: str) -> None:
        self._redis = redis
        self._prefix = queue_prefix

    def publish(self, study: dict[str, Any], stage: str, status: str) -> None:
        body = json.dumps(payload(study["id"], stage, status))
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.publish(study_channel(self._prefix, study["id"]), body)
            pipe.publish(tenant_channel(self._prefix, study["tenant_id"]), body)
            pipe.execute()
        except RedisError as exc:
            log.warning("event not published: %s", type(exc).__name__)


def publish(
    publisher: EventPublisher | None, study: dict[str, Any], stage: str, status: str = "processing"
) -> None:
    """One-line hook for the pipeline; a context without a publisher publishes nothing."""
    if publisher is not None:
        publisher.publish(study, stage, status)
