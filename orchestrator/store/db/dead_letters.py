"""SQL for the dead-letter list (table ``dead_letters``). Rows come back as ``DeadLetter``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import Connection
from psycopg.rows import class_row


@dataclass(frozen=True)
class DeadLetter:
    study_id: UUID
    tenant_id: UUID
    job_id: str
    reason: str
    attempts: int
    created_at: datetime
    # The study's status now (failed, unless it was requeued or re-run since).
    status: str


def insert(
    conn: Connection, *, study_id: UUID, tenant_id: UUID, job_id: str, reason: str, attempts: int
) -> None:
    """Record the study as dead-lettered (again: the newest reason and count win)."""
    conn.execute(
        "INSERT INTO dead_letters (study_id, tenant_id, job_id, reason, attempts)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (study_id) DO UPDATE SET"
        " reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, created_at = now()",
        (study_id, tenant_id, job_id, reason, attempts),
    )


def page(conn: Connection, *, limit: int, offset: int = 0) -> tuple[list[DeadLetter], int]:
    """Newest first, and the total count."""
    total = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        rows = cur.execute(
            "SELECT d.study_id, d.tenant_id, d.job_id, d.reason, d.attempts, d.created_at,"
            " s.status FROM dead_letters d JOIN studies s ON s.id = d.study_id"
            " ORDER BY d.created_at DESC, d.study_id LIMIT %s OFFSET %s",
            (limit, offset),
        ).fetchall()
    return rows, int(total[0]) if total else 0


def study_ids(conn: Connection, only: list[UUID] | None) -> list[UUID]:
    """The dead-lettered studies, oldest first (all, or those of ``only`` that are)."""
    if only is None:
        rows = conn.execute("SELECT study_id FROM dead_letters ORDER BY created_at").fetchall()
    else:
        rows = conn.execute(
            "SELECT study_id FROM dead_letters WHERE study_id = ANY(%s)", (only,)
        ).fetchall()
    return [UUID(str(r[0])) for r in rows]


def delete(conn: Connection, study_id: UUID) -> None:
    conn.execute("DELETE FROM dead_letters WHERE study_id = %s", (study_id,))
