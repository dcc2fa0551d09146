"""Enqueueing study jobs on RQ. Redis is the transport; PostgreSQL holds the truth.

One job per study (the job grain): all of a study's images go to Triton in batches from one
worker, which keeps a study's images on one model version and amortises per-job overhead.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from uuid import UUID

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from orchestrator.errors import DependencyUnavailable

STAGE_PROCESS = "process"
# A finished job's record (attempts, worker, outcome, timings) is in PostgreSQL (tables jobs,
# job_attempts); RQ's own copy only has to outlive the job briefly. Not 0: RQ deletes a job
# with no result TTL at once, in extra round trips, which cost a worker more CPU per job than
# letting the keys expire (profile_stack, alternated: 17.1 vs 15.7 ms per one-image study).
# A failed job's is kept a week (dead-letter listing).
RESULT_TTL_S = 30
FAILURE_TTL_S = 7 * 24 * 3600
# Transient failures (Triton or a dependency briefly down) get this many more attempts.
RETRY_MAX = 3
RETRY_INTERVALS_S = [5, 20, 60]
# Redis socket timeouts for the API's connection: a hung Redis must not hang uploads.
REDIS_SOCKET_TIMEOUT_S = 5.0
# Workers ping an idle connection older than this before using it (a restarted Redis).
REDIS_HEALTH_CHECK_S = 10

_ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def connect(url: str) -> Redis:
    return Redis.from_url(
        url, socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S
    )


def job_id(study_id: UUID, stage: str = STAGE_PROCESS) -> str:
    """Derived from the work, so the same study cannot be queued twice at once."""
    return f"study-{study_id}-{stage}"


def job_status(redis: Redis, study_id: UUID) -> JobStatus | None:
    """The RQ status of the study's job (one HGET, not a whole job fetch); None when there is
    no job or its status is not one RQ knows."""
    raw = redis.hget(Job.key_for(job_id(study_id)), "status")
    if raw is None:
        return None
    try:
        return JobStatus(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return None


def job_running(redis: Redis, study_id: UUID) -> bool:
    """Whether the study's job is running now (False when Redis cannot say)."""
    try:
        return job_status(redis, study_id) == JobStatus.STARTED
    except RedisError:
        return False


def enqueue_study(
    redis: Redis,
    queue_name: str,
    study_id: UUID,
    *,
    job_timeout_s: int,
    priority: str | None = None,
) -> bool:
    """Queue the study's job unless it is already queued or running; True when enqueued.
    A study of ``priority`` 'stat' goes ahead of every waiting job (the wait for a worker is
    where STAT gains most; it also reaches Triton at its highest priority, orchestrator/pipeline/infer.py)."""
    jid = job_id(study_id)
    try:
        status = job_status(redis, study_id)
        if status in _ACTIVE:
            return False
        if status is not None:
            # A finished or failed run's record, set to expire (RESULT_TTL_S, FAILURE_TTL_S):
            # the new job would be saved into the same key and expire with it.
            redis.delete(Job.key_for(jid))
        Queue(queue_name, connection=redis).enqueue(
            "orchestrator.queue.worker.run_study_job",
            str(study_id),
            job_id=jid,
            job_timeout=job_timeout_s,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            retry=Retry(max=RETRY_MAX, interval=RETRY_INTERVALS_S),
            description=f"process study {study_id}",
            at_front=priority == "stat",
        )
    except RedisError as exc:
        raise DependencyUnavailable("redis", type(exc).__name__) from exc
    return True


def requeue_study(
    redis: Redis,
    queue_name: str,
    study_id: UUID,
    *,
    job_timeout_s: int,
    priority: str | None = None,
) -> None:
    """Drop whatever is left of the study's job (an abandoned start, a failure record) and
    queue it afresh (STAT first, as ``enqueue_study``). For the reconciler and ``medtriage
    requeue``; safe because runs are idempotent and only the newest run's claim can finish
    the study."""
    try:
        with contextlib.suppress(NoSuchJobError):
            Job.fetch(job_id(study_id), connection=redis).delete(remove_from_queue=True)
    except RedisError as exc:
        raise DependencyUnavailable("redis", type(exc).__name__) from exc
    enqueue_study(redis, queue_name, study_id, job_timeout_s=job_timeout_s, priority=priority)


def queue_depth(redis: Redis, queue_name: str) -> int:
    return len(Queue(queue_name, connection=redis))


def oldest_queued_age_s(redis: Redis, queue_name: str) -> float:
    """Seconds the job at the head of the queue has waited; 0 when the queue is empty."""
    for jid in Queue(queue_name, connection=redis).get_job_ids(0, 1):
        try:
            job = Job.fetch(jid, connection=redis)
        except NoSuchJobError:
            continue
        if job.enqueued_at is not None:
            return max(
                0.0, (datetime.now(UTC) - job.enqueued_at.replace(tzinfo=UTC)).total_seconds()
            )
    return 0.0


def connect_worker(url: str) -> Redis:
    """The worker's connection: no read timeout, since RQ's dequeue blocks for up to
    ``WORKER_TTL_S - 15`` seconds; a dead server still fails fast (the socket is reset)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=REDIS_HEALTH_CHECK_S,
    )
