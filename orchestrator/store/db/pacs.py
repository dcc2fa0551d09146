"""SQL for PACS export: a tenant's targets (``pacs_targets``) and every export attempt of a
report revision (``report_exports``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row


def upsert_target(
    conn: Connection, tenant_id: UUID, name: str, stow_url: str, *, allow_http: bool = False
) -> dict[str, Any]:
    """Add the target, or point an existing one of that name at ``stow_url`` (active again)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "INSERT INTO pacs_targets (tenant_id, name, stow_url, allow_http)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, name) DO UPDATE SET"
            " stow_url = EXCLUDED.stow_url, allow_http = EXCLUDED.allow_http, active = true"
            " RETURNING id, name, stow_url, allow_http, active, created_at",
            (tenant_id, name, stow_url, allow_http),
        ).fetchone()
    assert row is not None
    return row


def active_targets(conn: Connection, tenant_id: UUID, name: str | None) -> list[dict[str, Any]]:
    """The tenant's active targets (all, or the one called ``name``), by name."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, name, stow_url, allow_http, active, created_at FROM pacs_targets"
            " WHERE tenant_id = %s AND active AND (%s::text IS NULL OR name = %s) ORDER BY name",
            (tenant_id, name, name),
        ).fetchall()


def insert_export(
    conn: Connection,
    *,
    study_id: UUID,
    revision: int,
    target: str,
    outcome: str,
    detail: str | None,
    sop_instance_uid: str | None,
) -> None:
    conn.execute(
        "INSERT INTO report_exports (study_id, revision, target, outcome, detail,"
        " sop_instance_uid) VALUES (%s, %s, %s, %s, %s, %s)",
        (study_id, revision, target, outcome, detail, sop_instance_uid),
    )
