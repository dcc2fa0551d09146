"""Legal hold: a study on hold is never purged by retention, whatever its tenant's policies.

Putting a study on hold and releasing it each need a reason; both are written to the audit
trail with it (action ``study.legal_hold`` / ``study.legal_hold_release``), and the study
keeps who held it, when and why until it is released. Admins use the API
(``/v1/studies/{id}/legal-hold``, ``/v1/legal-holds``); operators the CLI
(``medtriage legal-hold set|release|list``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Connection

from orchestrator.errors import BadRequest, NotFound
from orchestrator.store.db.audit import record

# A reason is a sentence or two (a matter number, who asked), not a document.
REASON_MAX_CHARS = 2000
# Held studies listed per page.
LIST_LIMIT_MAX = 500


class StudyNotFound(NotFound):
    pass


@dataclass(frozen=True)
class Actor:
    """Who asks, for the audit row: an API key (with its request) or the CLI."""

    name: str
    principal_id: UUID | None = None
    tenant_id: UUID | None = None  # the caller's tenant: only its studies; None: any (CLI)
    request_id: str | None = None
    source_ip: str | None = None


def _reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise BadRequest("a legal hold needs a reason (e.g. the matter it is kept for)")
    if len(text) > REASON_MAX_CHARS:
        raise BadRequest(f"the reason is longer than {REASON_MAX_CHARS} characters")
    return text


def _set(conn: Connection, study_id: UUID, held: bool, reason: str, actor: Actor) -> dict[str, Any]:
    text = _reason(reason)
    row = conn.execute(
        "UPDATE studies SET legal_hold = %s, legal_hold_reason = %s, legal_hold_by = %s,"
        " legal_hold_at = CASE WHEN %s THEN now() END"
        " WHERE id = %s AND (%s::uuid IS NULL OR tenant_id = %s)"
        " RETURNING id, tenant_id, status, created_at, legal_hold, legal_hold_reason,"
        " legal_hold_by, legal_hold_at",
        (
            held,
            text if held else None,
            actor.name if held else None,
            held,
            study_id,
            actor.tenant_id,
            actor.tenant_id,
        ),
    ).fetchone()
    record(
        conn,
        tenant_id=row[1] if row else actor.tenant_id,
        principal_id=actor.principal_id,
        principal=actor.name,
        action="study.legal_hold" if held else "study.legal_hold_release",
        resource_type="study",
        resource_id=str(study_id),
        outcome="ok" if row else "not_found",
        request_id=actor.request_id,
        source_ip=actor.source_ip,
        detail={"reason": text},
    )
    conn.commit()
    if row is None:
        raise StudyNotFound(f"study {study_id} not found")
    return _public(row)


def hold(conn: Connection, study_id: UUID, *, reason: str, actor: Actor) -> dict[str, Any]:
    """Put the study on hold (again: the new reason replaces the old); audited."""
    return _set(conn, study_id, True, reason, actor)


def release(conn: Connection, study_id: UUID, *, reason: str, actor: Actor) -> dict[str, Any]:
    """Take the study off hold; retention applies to it again from the next purge."""
    return _set(conn, study_id, False, reason, actor)


def held(
    conn: Connection, *, tenant_id: UUID | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Studies on hold (of one tenant, or all), newest hold first, and how many in all."""
    limit = max(1, min(limit, LIST_LIMIT_MAX))
    where = "WHERE legal_hold AND (%s::uuid IS NULL OR tenant_id = %s)"
    total = conn.execute(f"SELECT count(*) FROM studies {where}", (tenant_id, tenant_id)).fetchone()
    rows = conn.execute(
        "SELECT id, tenant_id, status, created_at, legal_hold, legal_hold_reason, legal_hold_by,"
        f" legal_hold_at FROM studies {where}"
        " ORDER BY legal_hold_at DESC NULLS LAST, id LIMIT %s OFFSET %s",
        (tenant_id, tenant_id, limit, offset),
    ).fetchall()
    return [_public(r) for r in rows], int(total[0]) if total else 0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _public(row: Any) -> dict[str, Any]:
    return {
        "study_id": str(row[0]),
        "tenant_id": str(row[1]),
        "status": row[2],
        "created_at": _iso(row[3]),
        "legal_hold": bool(row[4]),
        "reason": row[5],
        "held_by": row[6],
        "held_at": _iso(row[7]),
    }
