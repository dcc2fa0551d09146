"""SQL for studies, series, instances, jobs and results. Rows come back as dicts.

A study's status is written only by ``orchestrator/lifecycle.py``.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

STUDY_COLUMNS = (
    "id, tenant_id, study_uid, status, priority, created_at, updated_at, queued_at,"
    " started_at, finished_at, error, timings"
)


def upsert_series(conn: Connection, *, study_id: UUID, series_uid: str, modality: str) -> UUID:
    row = conn.execute(
        "INSERT INTO series (study_id, series_uid, modality) VALUES (%s, %s, %s)"
        " ON CONFLICT (study_id, series_uid) DO UPDATE SET modality = EXCLUDED.modality"
        " RETURNING id",
        (study_id, series_uid, modality),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def instance_exists(conn: Connection, *, study_id: UUID, sop_uid: str) -> UUID | None:
    row = conn.execute(
        "SELECT id FROM instances WHERE study_id = %s AND sop_uid = %s", (study_id, sop_uid)
    ).fetchone()
    return UUID(str(row[0])) if row else None


def stored_instance(
    conn: Connection, *, tenant_id: UUID, study_uid: str, sop_uid: str
) -> tuple[UUID, str] | None:
    """The study holding this SOP instance if the tenant has it, and the SHA-256 of the file
    stored (a resumed import skips the same file)."""
    row = conn.execute(
        "SELECT s.id, i.sha256 FROM instances i JOIN studies s ON s.id = i.study_id"
        " WHERE s.tenant_id = %s AND s.study_uid = %s AND i.sop_uid = %s",
        (tenant_id, study_uid, sop_uid),
    ).fetchone()
    return (UUID(str(row[0])), str(row[1])) if row else None


def stored_content(
    conn: Connection, *, study_id: UUID, sop_uid: str
) -> tuple[str, str | None, str | None] | None:
    """(SOP class, transfer syntax, content digest) of a stored SOP instance; None if none."""
    row = conn.execute(
        "SELECT sop_class_uid, transfer_syntax_uid, content_sha256 FROM instances"
        " WHERE study_id = %s AND sop_uid = %s",
        (study_id, sop_uid),
    ).fetchone()
    return (str(row[0]), row[1], row[2]) if row else None


def claim_patient(
    conn: Connection, study_id: UUID, *, id_key: str | None, demo_key: str | None
) -> tuple[str | None, str | None]:
    """The study's patient digests as they were (its row locked for this transaction), and
    the ones it lacked filled in from this instance's."""
    row = conn.execute(
        "SELECT patient_id_key, patient_demo_key FROM studies WHERE id = %s FOR UPDATE",
        (study_id,),
    ).fetchone()
    assert row is not None
    if (row[0] is None and id_key) or (row[1] is None and demo_key):
        conn.execute(
            "UPDATE studies SET patient_id_key = coalesce(patient_id_key, %s),"
            " patient_demo_key = coalesce(patient_demo_key, %s) WHERE id = %s",
            (id_key, demo_key, study_id),
        )
    return row[0], row[1]


def insert_instance(conn: Connection, **fields: Any) -> bool:
    """Insert an instance row; False when the SOP instance is already stored (duplicate)."""
    cur = conn.execute(
        "INSERT INTO instances (id, study_id, series_id, sop_uid, sop_class_uid,"
        " transfer_syntax_uid, rows, columns, frames, object_key, size_bytes, sha256,"
        " content_sha256)"
        " VALUES (%(id)s, %(study_id)s, %(series_id)s, %(sop_uid)s, %(sop_class_uid)s,"
        " %(transfer_syntax_uid)s, %(rows)s, %(columns)s, %(frames)s, %(object_key)s,"
        " %(size_bytes)s, %(sha256)s, %(content_sha256)s)"
        " ON CONFLICT (study_id, sop_uid) DO NOTHING",
        fields,
    )
    return cur.rowcount == 1


def get_study(conn: Connection, study_id: UUID, *, tenant_id: UUID | None) -> dict[str, Any] | None:
    """One study; scoped to ``tenant_id`` unless None (workers act for every tenant)."""
    with conn.cursor(row_factory=dict_row) as cur:
        if tenant_id is None:
            return cur.execute(
                f"SELECT {STUDY_COLUMNS} FROM studies WHERE id = %s", (study_id,)
            ).fetchone()
        return cur.execute(
            f"SELECT {STUDY_COLUMNS} FROM studies WHERE id = %s AND tenant_id = %s",
            (study_id, tenant_id),
        ).fetchone()


def list_studies(
    conn: Connection, *, tenant_id: UUID, limit: int, offset: int, status: str | None
) -> tuple[list[dict[str, Any]], int]:
    where = "tenant_id = %s" + (" AND status = %s" if status else "")
    params: list[Any] = [tenant_id] + ([status] if status else [])
    with conn.cursor(row_factory=dict_row) as cur:
        total_row = cur.execute(
            f"SELECT count(*) AS n FROM studies WHERE {where}", params
        ).fetchone()
        rows = cur.execute(
            f"SELECT {STUDY_COLUMNS},"
            " (SELECT count(*) FROM instances i WHERE i.study_id = studies.id) AS instance_count"
            f" FROM studies WHERE {where} ORDER BY created_at DESC, id LIMIT %s OFFSET %s",
            [*params, limit, offset],
        ).fetchall()
    return rows, int(total_row["n"]) if total_row else 0


def instances(conn: Connection, study_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT i.id, i.series_id, s.series_uid, s.modality, i.sop_uid, i.sop_class_uid,"
            " i.transfer_syntax_uid, i.rows, i.columns, i.frames, i.object_key, i.size_bytes,"
            " i.sha256, i.preview_key, i.status, i.error, i.warnings, i.created_at"
            " FROM instances i JOIN series s ON s.id = i.series_id"
            " WHERE i.study_id = %s ORDER BY i.created_at, i.sop_uid",
            (study_id,),
        ).fetchall()


def finish_instances(
    conn: Connection,
    rows: list[tuple[UUID, str, str | None, list[str], str | None]],
) -> None:
    """Set instances' final states in one round trip: (id, status, preview key, warnings,
    error) each; a None preview key keeps the stored one."""
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE instances SET status = %s, preview_key = coalesce(%s, preview_key),"
            " warnings = %s, error = %s WHERE id = %s",
            [(status, key, warnings, error, iid) for iid, status, key, warnings, error in rows],
        )


def insert_results(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Record model outputs in one round trip (psycopg pipelines ``executemany``); idempotent
    per (instance, model, version)."""
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO results (study_id, instance_id, model, version, arm, label, confidence,"
            " outputs, findings, latency_ms)"
            " VALUES (%(study_id)s, %(instance_id)s, %(model)s, %(version)s, %(arm)s, %(label)s,"
            " %(confidence)s, %(outputs)s, %(findings)s, %(latency_ms)s)"
            " ON CONFLICT (instance_id, model, version) DO NOTHING",
            [{**r, "outputs": Jsonb(r["outputs"]), "findings": Jsonb(r["findings"])} for r in rows],
        )


def results(
    conn: Connection, study_id: UUID, *, include_shadow: bool = False
) -> list[dict[str, Any]]:
    arm_filter = "" if include_shadow else " AND arm = 'live'"
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT instance_id, model, version, arm, label, confidence, outputs, findings,"
            f" latency_ms, created_at FROM results WHERE study_id = %s{arm_filter}"
            " ORDER BY created_at, model",
            (study_id,),
        ).fetchall()


def open_review_case(
    conn: Connection, *, tenant_id: UUID, study_id: UUID, reasons: list[str], urgency: int
) -> None:
    conn.execute(
        "INSERT INTO review_cases (tenant_id, study_id, reasons, urgency) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (study_id) DO NOTHING",
        (tenant_id, study_id, reasons, urgency),
    )


def review_case(conn: Connection, study_id: UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, reasons, urgency, status, verdict, correct_label, created_at"
            " FROM review_cases WHERE study_id = %s",
            (study_id,),
        ).fetchone()


# --- jobs ---------------------------------------------------------------------------


def upsert_job(conn: Connection, *, job_id: str, study_id: UUID, stage: str) -> None:
    conn.execute(
        "INSERT INTO jobs (id, study_id, stage, status) VALUES (%s, %s, %s, 'queued')"
        " ON CONFLICT (id) DO UPDATE SET status = 'queued', updated_at = now()",
        (job_id, study_id, stage),
    )


def ensure_job(conn: Connection, *, job_id: str, study_id: UUID, stage: str) -> None:
    """The job row, if the ingest died before writing it (an existing row is left as is)."""
    conn.execute(
        "INSERT INTO jobs (id, study_id, stage, status) VALUES (%s, %s, %s, 'queued')"
        " ON CONFLICT (id) DO NOTHING",
        (job_id, study_id, stage),
    )


def reset_job(conn: Connection, *, job_id: str, study_id: UUID, stage: str) -> None:
    """Queued again with its attempts cleared (a dead letter sent back)."""
    conn.execute(
        "INSERT INTO jobs (id, study_id, stage, status) VALUES (%s, %s, %s, 'queued')"
        " ON CONFLICT (id) DO UPDATE SET status = 'queued', attempts = 0,"
        " last_error = NULL, updated_at = now()",
        (job_id, study_id, stage),
    )


def start_attempt(conn: Connection, *, job_id: str, worker: str) -> int:
    row = conn.execute(
        "UPDATE jobs SET status = 'started', attempts = attempts + 1, updated_at = now()"
        " WHERE id = %s RETURNING attempts",
        (job_id,),
    ).fetchone()
    attempt = int(row[0]) if row else 1
    conn.execute(
        "INSERT INTO job_attempts (job_id, attempt, worker) VALUES (%s, %s, %s)"
        " ON CONFLICT (job_id, attempt) DO NOTHING",
        (job_id, attempt, worker),
    )
    return attempt


def finish_attempt(
    conn: Connection, *, job_id: str, attempt: int, outcome: str, error: str | None = None
) -> None:
    conn.execute(
        "UPDATE job_attempts SET finished_at = now(), outcome = %s, error = %s"
        " WHERE job_id = %s AND attempt = %s",
        (outcome, error, job_id, attempt),
    )
    conn.execute(
        "UPDATE jobs SET status = %s, last_error = %s, updated_at = now() WHERE id = %s",
        (outcome, error, job_id),
    )


def reports(conn: Connection, study_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT revision, format, object_key, created_at FROM reports WHERE study_id = %s"
            " ORDER BY revision DESC, format",
            (study_id,),
        ).fetchall()


def insert_report(
    conn: Connection, *, study_id: UUID, revision: int, fmt: str, object_key: str
) -> None:
    conn.execute(
        "INSERT INTO reports (study_id, revision, format, object_key) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (study_id, revision, format) DO NOTHING",
        (study_id, revision, fmt, object_key),
    )


def next_revision(conn: Connection, study_id: UUID) -> int:
    row = conn.execute(
        "SELECT coalesce(max(revision), 0) + 1 FROM reports WHERE study_id = %s", (study_id,)
    ).fetchone()
    return int(row[0]) if row else 1


def lock_study(conn: Connection, study_id: UUID) -> None:
    """Hold the study row for this transaction (serialises report revisions per study)."""
    conn.execute("SELECT 1 FROM studies WHERE id = %s FOR UPDATE", (study_id,))


def preview_key(conn: Connection, study_id: UUID, instance_id: UUID) -> str | None:
    row = conn.execute(
        "SELECT preview_key FROM instances WHERE id = %s AND study_id = %s",
        (instance_id, study_id),
    ).fetchone()
    return str(row[0]) if row is not None and row[0] is not None else None


def stale_open(
    conn: Connection,
    *,
    stage: str,
    open_states: list[str],
    received: str,
    stale_after_s: float,
    gathering_s: float,
    limit: int,
) -> list[tuple[UUID, int, str | None]]:
    """Open studies untouched for ``stale_after_s``: (id, job attempts, last job error).

    A received study still gathering instances (an arrival within ``gathering_s``) is the
    arrivals sweeper's, not stale: taking it would process it half-complete, then again when
    complete. Only once it has outlived its stable age by the stale time (no sweeper ran)."""
    rows = conn.execute(
        "SELECT s.id, coalesce(j.attempts, 0), j.last_error FROM studies s"
        " LEFT JOIN jobs j ON j.study_id = s.id AND j.stage = %s"
        " WHERE s.status = ANY(%s)"
        " AND s.updated_at < now() - make_interval(secs => %s)"
        " AND NOT (s.status = %s AND EXISTS (SELECT 1 FROM study_arrivals a"
        "  WHERE a.study_id = s.id AND a.last_at >= now() - make_interval(secs => %s)))"
        " ORDER BY s.updated_at LIMIT %s",
        (stage, open_states, stale_after_s, received, gathering_s, limit),
    ).fetchall()
    return [(UUID(str(r[0])), int(r[1]), r[2]) for r in rows]
