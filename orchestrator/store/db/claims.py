"""Run claims: the one run of a study allowed to write its report and final state.

A job may be delivered twice (RQ retry after a worker was presumed dead, the reconciler,
a duplicate enqueue). Each run that moves the study to 'processing' takes a fresh claim
token; the newest claim wins. The final transaction locks the study row and checks the
token, so a superseded run writes nothing final. Results are unique per (instance, model,
version) anyway, so whichever run finishes stores the same rows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orchestrator.store.db.studies import STUDY_COLUMNS, StudyStatus

# States a run may claim from: queued (normal), received (enqueue raced the status update),
# processing (a previous run died or is being superseded).
CLAIMABLE = (StudyStatus.QUEUED, StudyStatus.RECEIVED, StudyStatus.PROCESSING)


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
            "UPDATE studies SET status = 'processing', claim_token = %s, error = NULL,"
            " started_at = now(), updated_at = now() WHERE id = %s AND status = ANY(%s)"
            f" RETURNING {STUDY_COLUMNS},"
            " extract(epoch FROM (started_at - queued_at)) * 1000 AS queue_wait_ms",
            (token, study_id, [s.value for s in CLAIMABLE]),
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
            " WHERE id = %s AND status = 'processing' AND claim_token = %s FOR UPDATE",
            (study_id, token),
        ).fetchone()


def next_revision(conn: Connection, study_id: UUID) -> int:
    row = conn.execute(
        "SELECT coalesce(max(revision), 0) + 1 FROM reports WHERE study_id = %s", (study_id,)
    ).fetchone()
    return int(row[0]) if row else 1


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
        " WHERE id = %s AND status = 'processing' AND claim_token = %s",
        (new.value, error, Jsonb(merged), study_id, token),
    )
    return cur.rowcount == 1
