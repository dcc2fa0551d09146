"""SQL for the review cases (table ``review_cases``) and the reviewed-accuracy figures read
from them. Cases move only by conditional updates; each returns whether it moved."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

_CASE_COLUMNS = (
    "rc.id, rc.study_id, rc.reasons, rc.urgency, rc.status, rc.claimed_by, rc.claimed_by_name,"
    " rc.claimed_at, rc.verdict, rc.correct_label, rc.note, rc.verdict_by_name, rc.closed_at,"
    " rc.created_at, rc.details, s.priority, s.study_uid"
)


def insert_case(
    conn: Connection,
    *,
    tenant_id: UUID,
    study_id: UUID,
    reasons: list[str],
    urgency: int,
    details: dict[str, Any],
) -> None:
    """Open the study's case (once per study: a second insert is a no-op)."""
    conn.execute(
        "INSERT INTO review_cases (tenant_id, study_id, reasons, urgency, details)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (study_id) DO NOTHING",
        (tenant_id, study_id, reasons, urgency, Jsonb(details)),
    )


def cases(
    conn: Connection, tenant_id: UUID, *, statuses: list[str], limit: int
) -> list[dict[str, Any]]:
    """Cases of a tenant, most urgent first (critical findings, then STAT), then oldest."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {_CASE_COLUMNS} FROM review_cases rc JOIN studies s ON s.id = rc.study_id"
            " WHERE rc.tenant_id = %s AND rc.status = ANY(%s)"
            " ORDER BY rc.urgency DESC, rc.created_at, rc.id LIMIT %s",
            (tenant_id, statuses, limit),
        ).fetchall()


def case(conn: Connection, tenant_id: UUID, case_id: UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {_CASE_COLUMNS} FROM review_cases rc JOIN studies s ON s.id = rc.study_id"
            " WHERE rc.id = %s AND rc.tenant_id = %s",
            (case_id, tenant_id),
        ).fetchone()


def case_results(conn: Connection, study_id: UUID) -> list[dict[str, Any]]:
    """Every result of the case's study (live and shadow) with its instance's preview state."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT r.instance_id, r.model, r.version, r.arm, r.label, r.confidence, r.findings,"
            " r.outputs, i.preview_key IS NOT NULL AS has_preview, i.warnings"
            " FROM results r JOIN instances i ON i.id = r.instance_id"
            " WHERE r.study_id = %s ORDER BY i.created_at, r.model, r.arm, r.version",
            (study_id,),
        ).fetchall()


def claim(
    conn: Connection, tenant_id: UUID, case_id: UUID, *, by: UUID | None, by_name: str | None
) -> bool:
    """open → claimed by ``by``."""
    row = conn.execute(
        "UPDATE review_cases SET status = 'claimed', claimed_by = %s, claimed_by_name = %s,"
        " claimed_at = now() WHERE id = %s AND tenant_id = %s AND status = 'open' RETURNING id",
        (by, by_name, case_id, tenant_id),
    ).fetchone()
    return row is not None


def release(conn: Connection, tenant_id: UUID, case_id: UUID, *, by: UUID | None) -> bool:
    """claimed by ``by`` → open."""
    row = conn.execute(
        "UPDATE review_cases SET status = 'open', claimed_by = NULL, claimed_by_name = NULL,"
        " claimed_at = NULL WHERE id = %s AND tenant_id = %s AND status = 'claimed'"
        " AND claimed_by = %s RETURNING id",
        (case_id, tenant_id, by),
    ).fetchone()
    return row is not None


def close(
    conn: Connection,
    tenant_id: UUID,
    case_id: UUID,
    *,
    by: UUID | None,
    by_name: str | None,
    verdict: str,
    correct_label: str | None,
    note: str | None,
) -> UUID | None:
    """claimed by ``by`` → closed with the verdict; the case's study id, None if it did not move."""
    row = conn.execute(
        "UPDATE review_cases SET status = 'closed', verdict = %s, correct_label = %s, note = %s,"
        " verdict_by = %s, verdict_by_name = %s, closed_at = now()"
        " WHERE id = %s AND tenant_id = %s AND status = 'claimed' AND claimed_by = %s"
        " RETURNING study_id",
        (verdict, correct_label, note, by, by_name, case_id, tenant_id, by),
    ).fetchone()
    return UUID(str(row[0])) if row is not None else None


# Per version of ``model``: reviewed results, correct ones, and the confusion counts
# (positive = any label other than ``normal``) against the reviewers' truth.
_STATS_SQL = """
WITH truth AS (
    SELECT study_id, verdict, correct_label FROM review_cases
    WHERE status = 'closed' AND verdict IS NOT NULL
      AND (%(tenant)s::uuid IS NULL OR tenant_id = %(tenant)s::uuid)
),
ref AS (
    SELECT instance_id, label FROM results
    WHERE model = %(truth_model)s AND arm = 'live' AND study_id IN (SELECT study_id FROM truth)
),
scored AS (
    SELECT r.version, r.arm, r.label AS predicted,
           CASE WHEN t.verdict = 'override' THEN t.correct_label ELSE ref.label END AS actual
    FROM results r
    JOIN truth t ON t.study_id = r.study_id
    LEFT JOIN ref ON ref.instance_id = r.instance_id
    WHERE r.model = %(model)s
)
SELECT version,
       string_agg(DISTINCT arm, ',') AS arms,
       count(*) AS n,
       count(*) FILTER (WHERE predicted = actual) AS correct,
       count(*) FILTER (WHERE predicted <> ALL(%(normal)s) AND actual <> ALL(%(normal)s)) AS tp,
       count(*) FILTER (WHERE predicted = ANY(%(normal)s) AND actual <> ALL(%(normal)s)) AS fn,
       count(*) FILTER (WHERE predicted = ANY(%(normal)s) AND actual = ANY(%(normal)s)) AS tn,
       count(*) FILTER (WHERE predicted <> ALL(%(normal)s) AND actual = ANY(%(normal)s)) AS fp
FROM scored WHERE actual IS NOT NULL
GROUP BY version ORDER BY version
"""


def accuracy_counts(
    conn: Connection,
    *,
    model: str,
    truth_model: str,
    normal: list[str],
    tenant_id: UUID | None,
) -> list[tuple[int, str, int, int, int, int, int, int]]:
    """(version, arms, n, correct, tp, fn, tn, fp) per version."""
    params = {"tenant": tenant_id, "model": model, "truth_model": truth_model, "normal": normal}
    return [
        (int(v), str(arms), int(n), int(c), int(tp), int(fn), int(tn), int(fp))
        for v, arms, n, c, tp, fn, tn, fp in conn.execute(_STATS_SQL, params).fetchall()
    ]


def models_with_results(conn: Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT DISTINCT model FROM results ORDER BY 1")]
