"""Break-glass: emergency access that needs a reason, expires, is audited and alerts.

A grant adds one role to its holder for at most ``break_glass_max_s``; every request made
under it is written to the audit, and ``medtriage_break_glass_grants_total`` goes up.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from psycopg import Connection

from orchestrator import metrics
from orchestrator.errors import BadRequest

# Roles a grant may add: patient-data read and operations; never admin (it would grant grants).
GRANTABLE_ROLES = ("reviewer", "ml-engineer", "sre")
MIN_REASON_CHARS = 10


def grant(
    conn: Connection,
    *,
    tenant_id: UUID,
    principal_id: UUID,
    role: str,
    reason: str,
    duration: timedelta,
    max_duration: timedelta,
) -> tuple[UUID, datetime]:
    if role not in GRANTABLE_ROLES:
        raise BadRequest(f"break-glass may grant {', '.join(GRANTABLE_ROLES)}, not {role!r}")
    if len(reason.strip()) < MIN_REASON_CHARS:
        raise BadRequest(f"break-glass needs a reason of at least {MIN_REASON_CHARS} characters")
    if duration <= timedelta(0) or duration > max_duration:
        raise BadRequest(f"break-glass lasts between 1 s and {int(max_duration.total_seconds())} s")
    row = conn.execute(
        "INSERT INTO break_glass_grants (tenant_id, principal, role, reason, expires_at)"
        " VALUES (%s, %s, %s, %s, now() + %s) RETURNING id, expires_at",
        (tenant_id, str(principal_id), role, reason.strip(), duration),
    ).fetchone()
    assert row is not None
    metrics.BREAK_GLASS_GRANTS.labels(role).inc()
    return UUID(str(row[0])), row[1]


def active_roles(conn: Connection, principal_id: UUID, tenant_id: UUID) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT DISTINCT role FROM break_glass_grants WHERE principal = %s AND tenant_id = %s"
        " AND revoked_at IS NULL AND expires_at > now()",
        (str(principal_id), tenant_id),
    ).fetchall()
    return tuple(sorted(r[0] for r in rows))
