"""The dead-letter list: studies the platform stopped retrying, with the reason.

A study lands here when its job has run ``max_attempts`` times without finishing (the
worker died each time, or a dependency stayed down through every retry). It is marked
'failed' with the reason, so clients see a terminal state; ``requeue`` (API, CLI
``medtriage requeue``) clears its attempt count and sends it back to the queue.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from redis import Redis

from orchestrator import lifecycle
from orchestrator.queue import jobs as jobqueue
from orchestrator.store.db import translate_errors


def add(conn: Connection, study_id: UUID, *, reason: str, attempts: int) -> bool:
    """Fail the study with ``reason`` and record it; False when it was no longer open."""
    tenant_id = lifecycle.dead_letter(
        conn, study_id, f"dead-lettered after {attempts} attempts: {reason}"
    )
    if tenant_id is None:
        return False
    conn.execute(
        "INSERT INTO dead_letters (study_id, tenant_id, job_id, reason, attempts)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (study_id) DO UPDATE SET"
        " reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, created_at = now()",
        (study_id, tenant_id, jobqueue.job_id(study_id), reason, attempts),
    )
    return True


def list_items(
    conn: Connection, *, limit: int, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    with conn.cursor(row_factory=dict_row) as cur:
        total = cur.execute("SELECT count(*) AS n FROM dead_letters").fetchone()
        rows = cur.execute(
            "SELECT d.study_id, d.tenant_id, d.job_id, d.reason, d.attempts, d.created_at,"
            " s.status FROM dead_letters d JOIN studies s ON s.id = d.study_id"
            " ORDER BY d.created_at DESC, d.study_id LIMIT %s OFFSET %s",
            (limit, offset),
        ).fetchall()
    return rows, int(total["n"]) if total else 0


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
        if study_ids is None:
            rows = conn.execute("SELECT study_id FROM dead_letters ORDER BY created_at").fetchall()
        else:
            rows = conn.execute(
                "SELECT study_id FROM dead_letters WHERE study_id = ANY(%s)", (study_ids,)
            ).fetchall()
        ids = [UUID(str(r[0])) for r in rows]
        priorities: dict[UUID, str] = {}
        for study_id in ids:
            conn.execute("DELETE FROM dead_letters WHERE study_id = %s", (study_id,))
            priority = lifecycle.requeue_dead_letter(conn, study_id)
            if priority is not None:
                priorities[study_id] = priority
            conn.execute(
                "INSERT INTO jobs (id, study_id, stage, status) VALUES (%s, %s, %s, 'queued')"
                " ON CONFLICT (id) DO UPDATE SET status = 'queued', attempts = 0,"
                " last_error = NULL, updated_at = now()",
                (jobqueue.job_id(study_id), study_id, jobqueue.STAGE_PROCESS),
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
