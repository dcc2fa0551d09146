"""The dead-letter list: studies the platform stopped retrying, with the reason.

A study lands here when its job has run ``max_attempts`` times without finishing (the
worker died each time, or a dependency stayed down through every retry). It is marked
'failed' with the reason, so clients see a terminal state; ``requeue`` (API, CLI
``medtriage requeue``) clears its attempt count and sends it back to the queue.
"""

from __future__ import annotations

from uuid import UUID

from psycopg import Connection
from psycopg_pool import ConnectionPool
from redis import Redis

from orchestrator import lifecycle
from orchestrator.queue import jobs as jobqueue
from orchestrator.store.db import dead_letters, translate_errors
from orchestrator.store.db import studies as db


def add(conn: Connection, study_id: UUID, *, reason: str, attempts: int) -> bool:
    """Fail the study with ``reason`` and record it; False when it was no longer open."""
    tenant_id = lifecycle.dead_letter(
        conn, study_id, f"dead-lettered after {attempts} attempts: {reason}"
    )
    if tenant_id is None:
        return False
    dead_letters.insert(
        conn,
        study_id=study_id,
        tenant_id=tenant_id,
        job_id=jobqueue.job_id(study_id),
        reason=reason,
        attempts=attempts,
    )
    return True


def list_items(
    conn: Connection, *, limit: int, offset: int = 0
) -> tuple[list[dead_letters.DeadLetter], int]:
    return dead_letters.page(conn, limit=limit, offset=offset)


def requeue(
    pool: ConnectionPool,
    redis: Redis,
    queue_name: str,
    study_ids: list[UUID] | None,
    *,
    job_timeout_s: int,
) -> list[UUID]:
    """Send dead letters back (all when ``study_ids`` is None); return the ids requeued."""
    with translate_errors(), pool.connection() as conn:
        ids = dead_letters.study_ids(conn, study_ids)
        priorities: dict[UUID, str] = {}
        for study_id in ids:
            dead_letters.delete(conn, study_id)
            priority = lifecycle.requeue_dead_letter(conn, study_id)
            if priority is not None:
                priorities[study_id] = priority
            db.reset_job(
                conn,
                job_id=jobqueue.job_id(study_id),
                study_id=study_id,
                stage=jobqueue.STAGE_PROCESS,
            )
    # After the commit: if Redis fails here the studies are 'queued' in PostgreSQL and the
    # reconciler enqueues them.
    for study_id in ids:
        jobqueue.requeue_study(
            redis,
            queue_name,
            study_id,
            job_timeout_s=job_timeout_s,
            priority=priorities.get(study_id),
        )
    return ids
