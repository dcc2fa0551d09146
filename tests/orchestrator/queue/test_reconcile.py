"""The reconciler and RQ's scheduled registry (issue 16, item 1), on the real Redis: a retry
whose time is long past (its scheduler died with a Redis restart) is queued by the
reconciler; one that is merely due is left to RQ's scheduler; a 'scheduled' job in no
registry is lost."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.registry import ScheduledJobRegistry

from orchestrator.queue import jobs as jobqueue
from orchestrator.queue import reconcile


@pytest.fixture
def queue(redis_url: str, queue_prefix: str) -> Iterator[Queue]:
    redis = Redis.from_url(redis_url)
    q = Queue(f"{queue_prefix}:{uuid.uuid4().hex[:8]}", connection=redis)
    yield q
    registry = ScheduledJobRegistry(queue=q)
    for jid in [*q.get_job_ids(), *registry.get_job_ids()]:
        redis.delete(f"rq:job:{jid}")
    redis.delete(q.key, registry.key)
    redis.close()


def _scheduled(queue: Queue, study: uuid.UUID, seconds_ago: float) -> str:
    """A study job waiting for its retry, as RQ leaves it after a failed attempt."""
    when = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    job = queue.enqueue_at(
        when, "orchestrator.queue.worker.run_study_job", str(study), job_id=jobqueue.job_id(study)
    )
    return str(job.id)


def test_a_long_overdue_retry_is_queued_and_a_due_one_left_to_the_scheduler(
    queue: Queue,
) -> None:
    redis = queue.connection
    old, fresh = uuid.uuid4(), uuid.uuid4()
    old_id = _scheduled(queue, old, reconcile.SCHEDULED_OVERDUE_S + 60)
    fresh_id = _scheduled(queue, fresh, 1)
    assert reconcile.job_state(redis, "p", queue.name, old) == reconcile.ACTIVE

    assert reconcile.enqueue_overdue(redis, queue.name) == [old_id]
    assert queue.get_job_ids() == [old_id]
    assert queue.fetch_job(old_id).get_status() == JobStatus.QUEUED  # type: ignore[union-attr]
    assert ScheduledJobRegistry(queue=queue).get_job_ids() == [fresh_id]
    # Queued once: a second pass (or a scheduler that comes back) finds nothing to move.
    assert reconcile.enqueue_overdue(redis, queue.name) == []
    assert queue.get_job_ids() == [old_id]


def test_a_scheduled_job_in_no_registry_is_lost(queue: Queue) -> None:
    redis = queue.connection
    study = uuid.uuid4()
    jid = _scheduled(queue, study, 0)
    redis.zrem(ScheduledJobRegistry(queue=queue).key, jid)
    assert reconcile.job_state(redis, "p", queue.name, study) == reconcile.LOST
