"""The audit trail: one row per read of patient data, per change, per refused login."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.types.json import Jsonb


def record(
    conn: Connection,
    *,
    principal: str,
    action: str,
    resource_type: str,
    resource_id: str | None,
    outcome: str,
    tenant_id: UUID | None = None,
    principal_id: UUID | None = None,
    request_id: str | None = None,
    source_ip: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO audit_log (tenant_id, principal_id, principal, action, resource_type,"
        " resource_id, outcome, request_id, source_ip, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            tenant_id,
            principal_id,
            principal,
            action,
            resource_type,
            resource_id,
            outcome,
            request_id,
            source_ip,
            Jsonb(detail or {}),
        ),
    )
