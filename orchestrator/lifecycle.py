"""The study lifecycle: every status a study can be in, the state sets (open, claimable,
terminal), and every transition. Nothing else writes ``studies.status``; callers ask here
(``receive``, ``queue``, ``claim``/``hold``/``release``, ``dead_letter``,
``requeue_dead_letter``, ``mark_reviewed``)::

    receive ─▶ received ─queue─▶ queued ─claim─▶ processing ─release─▶ done | needs_review
                  ▲                 ▲               │ (a newer run)            | failed
                  │                 │               └─claim─▶ processing       | not_applicable
                  │                 └──────────── queue (new instances for a finished study)
    received | queued | processing ─dead_letter─▶ failed ─requeue_dead_letter─▶ queued
    needs_review ─mark_reviewed (review closed)─▶ done

Every transition is a conditional update (``... WHERE status = ANY(expected)``), so two
processes racing on one study cannot both move it.

Run claims: a job may be delivered twice (RQ retry after a worker was presumed dead, the
reconciler, a duplicate enqueue). Each run that moves the study to 'processing' takes a fresh
claim token; the newest claim wins. The final transaction locks the study row and checks the
token, so a superseded run writes nothing final. Results are unique per (instance, model,
version) anyway, so whichever run finishes stores the same rows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from redis import Redis

from orchestrator.queue import jobs as jobqueue
from orchestrator.store.db import arrivals, translate_errors
from orchestrator.store.db import studies as db
from orchestrator.store.db.studies import STUDY_COLUMNS


class StudyStatus(str, Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    NEEDS_REVIEW = "needs_review"
    # No image of the study meets any model set's applicability rules: no result, no review.
    NOT_APPLICABLE = "not_applicable"


# Not finished yet: the reconciler watches these, and only these can be dead-lettered (a
# finished study is never moved back).
OPEN = (StudyStatus.RECEIVED, StudyStatus.QUEUED, StudyStatus.PROCESSING)
# States a run may claim from: queued (normal), received (enqueue raced the status update),
# processing (a previous run died or is being superseded): every open state.
CLAIMABLE = OPEN
TERMINAL = (
    StudyStatus.DONE,
    StudyStatus.FAILED,
    StudyStatus.NEEDS_REVIEW,
    StudyStatus.NOT_APPLICABLE,
)
# As stored (text): for code that holds a status from JSON or a row.
OPEN_VALUES = frozenset(s.value for s in OPEN)
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
# States ``queue`` moves from: a new study, and a finished one that gained instances (results
# are idempotent per instance and model version). Not not_applicable: its images stay so.
QUEUEABLE = (
    StudyStatus.RECEIVED,
    StudyStatus.DONE,
    StudyStatus.FAILED,
    StudyStatus.NEEDS_REVIEW,
)


def _values(states: tuple[StudyStatus, ...]) -> list[str]:
    return [s.value for s in states]


def receive(
    conn: Connection, *, tenant_id: UUID, study_uid: str, priority: str, created_by: UUID | None
) -> UUID:
    """The study's id; a new study starts 'received' (an existing one keeps its state)."""
    row = conn.execute(
        "INSERT INTO studies (tenant_id, study_uid, status, priority, created_by)"
        " VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant_id, study_uid) DO UPDATE SET updated_at = now()"
        " RETURNING id",
        (tenant_id, study_uid, StudyStatus.RECEIVED.value, priority, created_by),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def mark_queued(
    conn: Connection, study_id: UUID, *, expected: tuple[StudyStatus, ...] = QUEUEABLE
) -> str | None:
    """Move the study to 'queued' only from one of ``expected``, and return its priority,
    moved or not (one statement: the queue needs the priority either way); None when there
    is no such study."""
    row = conn.execute(
        "WITH moved AS (UPDATE studies SET status = %s, error = NULL, updated_at = now(),"
        " queued_at = now() WHERE id = %s AND status = ANY(%s) RETURNING id)"
        " SELECT priority FROM studies WHERE id = %s",
        (StudyStatus.QUEUED.value, study_id, _values(expected), study_id),
    ).fetchone()
    return str(row[0]) if row is not None else None


def queue(
    pool: ConnectionPool, redis: Redis, queue_name: str, study_id: UUID, *, job_timeout_s: int
) -> None:
    """Mark the study queued and enqueue its job (REST, STOW, C-STORE, import, the arrivals
    sweeper). A study already finished is re-run for new instances."""
    with translate_errors(), pool.connection() as conn:
        priority = mark_queued(conn, study_id)
        jid = jobqueue.job_id(study_id)
        db.upsert_job(conn, job_id=jid, study_id=study_id, stage=jobqueue.STAGE_PROCESS)
    enqueued = jobqueue.enqueue_study(
        redis, queue_name, study_id, job_timeout_s=job_timeout_s, priority=priority
    )
    if not enqueued and jobqueue.job_running(redis, study_id):
        # The running job listed the study's instances when it started and would miss the
        # new ones: the arrivals sweeper queues the study again after that run. (A job still
        # waiting in the queue will see them.)
        with translate_errors(), pool.connection() as conn:
            arrivals.record(conn, study_id=study_id, source="rest", instances=0, complete=True)


@dataclass(frozen=True)
class Claim:
    token: UUID
    # From enqueue to this claim, ms; None when the study was never queued.
    queue_wait_ms: float | None
    # The study row as the claim left it.
    study: dict[str, Any]


def claim(conn: Connection, study_id: UUID) -> Claim | None:
    """Move the study to 'processing' under a new token; None when it is not claimable."""
    token = uuid.uuid4()
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "UPDATE studies SET status = %s, claim_token = %s, error = NULL,"
            " started_at = now(), updated_at = now() WHERE id = %s AND status = ANY(%s)"
            f" RETURNING {STUDY_COLUMNS},"
            " extract(epoch FROM (started_at - queued_at)) * 1000 AS queue_wait_ms",
            (StudyStatus.PROCESSING.value, token, study_id, _values(CLAIMABLE)),
        ).fetchone()
    if row is None:
        return None
    wait = row.pop("queue_wait_ms")
    return Claim(token, float(wait) if wait is not None else None, row)


def hold(conn: Connection, study_id: UUID, token: UUID) -> dict[str, Any] | None:
    """Lock the study row for this transaction if ``token`` still holds the claim, and
    return it; None when a newer run holds the study."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {STUDY_COLUMNS} FROM studies"
            " WHERE id = %s AND status = %s AND claim_token = %s FOR UPDATE",
            (study_id, StudyStatus.PROCESSING.value, token),
        ).fetchone()


def release(
    conn: Connection,
    study_id: UUID,
    token: UUID,
    new: StudyStatus,
    error: str | None,
    *,
    timings: dict[str, float] | None = None,
) -> bool:
    """Set the final state (and merge the run's stage ``timings``, ms) if ``token`` still
    holds the claim; True when it did."""
    merged = {k: round(v, 2) for k, v in (timings or {}).items()}
    cur = conn.execute(
        "UPDATE studies SET status = %s, error = %s, finished_at = now(), updated_at = now(),"
        " claim_token = NULL, timings = timings || %s"
        " WHERE id = %s AND status = %s AND claim_token = %s",
        (new.value, error, Jsonb(merged), study_id, StudyStatus.PROCESSING.value, token),
    )
    return cur.rowcount == 1


def dead_letter(conn: Connection, study_id: UUID, error: str) -> UUID | None:
    """Fail an open study that the platform stopped retrying; its tenant id, or None when it
    was no longer open."""
    row = conn.execute(
        "UPDATE studies SET status = %s, error = %s, finished_at = now(),"
        " updated_at = now(), claim_token = NULL WHERE id = %s AND status = ANY(%s)"
        " RETURNING tenant_id",
        (StudyStatus.FAILED.value, error, study_id, _values(OPEN)),
    ).fetchone()
    return UUID(str(row[0])) if row is not None else None


def requeue_dead_letter(conn: Connection, study_id: UUID) -> str | None:
    """Move a failed study back to 'queued'; its priority, or None when it was not failed."""
    row = conn.execute(
        "UPDATE studies SET status = %s, error = NULL, queued_at = now(),"
        " updated_at = now() WHERE id = %s AND status = %s RETURNING priority",
        (StudyStatus.QUEUED.value, study_id, StudyStatus.FAILED.value),
    ).fetchone()
    return str(row[0]) if row is not None else None


def touch_open(conn: Connection, study_id: UUID) -> str | None:
    """Push an open study's ``updated_at`` forward (the reconciler then waits its stale time
    again); its priority, or None when it is no longer open."""
    row = conn.execute(
        "UPDATE studies SET updated_at = now() WHERE id = %s AND status = ANY(%s)"
        " RETURNING priority",
        (study_id, _values(OPEN)),
    ).fetchone()
    return str(row[0]) if row is not None else None


def mark_reviewed(conn: Connection, study_id: UUID) -> bool:
    """A reviewed study is finished: needs_review → done. True when it moved."""
    cur = conn.execute(
        "UPDATE studies SET status = %s, updated_at = now() WHERE id = %s AND status = %s",
        (StudyStatus.DONE.value, study_id, StudyStatus.NEEDS_REVIEW.value),
    )
    return cur.rowcount == 1
