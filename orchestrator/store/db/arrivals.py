"""Study arrivals: studies whose instances came one by one and wait to be queued."""

from __future__ import annotations

from uuid import UUID

from psycopg import Connection


def record(
    conn: Connection, *, study_id: UUID, source: str, instances: int, complete: bool
) -> None:
    """Note new instances of a study (the stable-age clock restarts)."""
    conn.execute(
        "INSERT INTO study_arrivals (study_id, source, instances, complete)"
        " VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (study_id) DO UPDATE SET last_at = now(),"
        " instances = study_arrivals.instances + EXCLUDED.instances,"
        " complete = study_arrivals.complete OR EXCLUDED.complete",
        (study_id, source, instances, complete),
    )


def due(conn: Connection, *, stable_age_s: float, limit: int) -> list[tuple[UUID, str]]:
    """(study, source) of studies complete or quiet for ``stable_age_s``, locked for this
    transaction (several sweepers never take the same study)."""
    rows = conn.execute(
        "SELECT study_id, source FROM study_arrivals"
        " WHERE complete OR last_at < now() - make_interval(secs => %s)"
        " ORDER BY last_at LIMIT %s FOR UPDATE SKIP LOCKED",
        (stable_age_s, limit),
    ).fetchall()
    return [(UUID(str(r[0])), str(r[1])) for r in rows]


def forget(conn: Connection, study_id: UUID) -> None:
    conn.execute("DELETE FROM study_arrivals WHERE study_id = %s", (study_id,))


def waiting(conn: Connection, study_id: UUID) -> bool:
    row = conn.execute("SELECT 1 FROM study_arrivals WHERE study_id = %s", (study_id,)).fetchone()
    return row is not None
