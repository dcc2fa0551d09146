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
from uuid import UUID

from psycopg import Connection

from orchestrator.db.studies import StudyStatus

# States a run may claim from: queued (normal), received (enqueue raced the status update),
# processing (a previous run died or is being superseded).
CLAIMABLE = (StudyStatus.QUEUED, StudyStatus.RECEIVED, StudyStatus.PROCESSING)


@dataclass(frozen=True)
class Claim:
    token: UUID
    # From enqueue to this claim, ms; None when the study was never queued.
    queue_wait_ms: float | None


def claim(conn: Connection, study_id: UUID) -> Claim | None:
    """Move the study to 'processing' under a new token; None when it is not claimable."""
    token = uuid.uuid4()
    row = conn.execute(
        "UPDATE studies SET status = 'processing', claim_token = %s, error = NULL,"
        " started_at = now(), updated_at = now() WHERE id = %s AND status = ANY(%s)"
        " RETURNING extract(epoch FROM (started_at - queued_at)) * 1000",
        (token, study_id, [s.value for s in CLAIMABLE]),
    ).fetchone()
    if row is None:
        return None
    return Claim(token, float(row[0]) if row[0] is not None else None)


def hold(conn: Connection, study_id: UUID, token: UUID) -> bool:
    """Lock the study row for this transaction if ``token`` still holds the claim."""
    row = conn.execute(
        "SELECT id FROM studies WHERE id = %s AND status = 'processing' AND claim_token = %s"
        " FOR UPDATE",
        (study_id, token),
    ).fetchone()
    return row is not None


def next_revision(conn: Connection, study_id: UUID) -> int:
    row = conn.execute(
        "SELECT coalesce(max(revision), 0) + 1 FROM reports WHERE study_id = %s", (study_id,)
    ).fetchone()
    return int(row[0]) if row else 1


def release(
    conn: Connection, study_id: UUID, token: UUID, new: StudyStatus, error: str | None
) -> bool:
    """Set the final state if ``token`` still holds the claim; True when it did."""
    cur = conn.execute(
        "UPDATE studies SET status = %s, error = %s, finished_at = now(), updated_at = now(),"
        " claim_token = NULL WHERE id = %s AND status = 'processing' AND claim_token = %s",
        (new.value, error, study_id, token),
    )
    return cur.rowcount == 1
