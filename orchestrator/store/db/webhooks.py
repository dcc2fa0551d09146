"""SQL for webhook endpoints and their deliveries (tables ``webhooks``,
``webhook_deliveries``). A delivery is leased by pushing ``next_attempt_at`` forward, so two
dispatchers never send one at once (``FOR UPDATE SKIP LOCKED``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# Columns of an endpoint a tenant may see (never the secret).
_PUBLIC = "id, url, events, active, max_attempts, backoff_s, timeout_s, allow_http, created_at"
_DELIVERY = (
    "id, webhook_id, event, payload, status, attempts, last_status, last_error,"
    " next_attempt_at, created_at, delivered_at"
)


def insert_endpoint(
    conn: Connection,
    *,
    webhook_id: UUID,
    tenant_id: UUID,
    url: str,
    secret: str,
    events: list[str],
    max_attempts: int,
    backoff_s: float,
    timeout_s: float,
    allow_http: bool = False,
) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "INSERT INTO webhooks (id, tenant_id, url, secret, events, max_attempts, backoff_s,"
            f" timeout_s, allow_http) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            f" RETURNING {_PUBLIC}",
            (
                webhook_id,
                tenant_id,
                url,
                secret,
                events,
                max_attempts,
                backoff_s,
                timeout_s,
                allow_http,
            ),
        ).fetchone()
    assert row is not None
    return row


def active_endpoints(conn: Connection, tenant_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {_PUBLIC} FROM webhooks WHERE tenant_id = %s AND active ORDER BY created_at",
            (tenant_id,),
        ).fetchall()


def deactivate(conn: Connection, tenant_id: UUID, webhook_id: UUID) -> bool:
    """True when an active endpoint of the tenant was deactivated."""
    row = conn.execute(
        "UPDATE webhooks SET active = false WHERE id = %s AND tenant_id = %s AND active"
        " RETURNING id",
        (webhook_id, tenant_id),
    ).fetchone()
    return row is not None


def endpoint_exists(conn: Connection, tenant_id: UUID, webhook_id: UUID) -> bool:
    row = conn.execute(
        "SELECT 1 FROM webhooks WHERE id = %s AND tenant_id = %s", (webhook_id, tenant_id)
    ).fetchone()
    return row is not None


def insert_deliveries(
    conn: Connection, tenant_id: UUID, event: str, payload: dict[str, Any]
) -> int:
    """One pending delivery per active endpoint of the tenant that wants ``event``."""
    cur = conn.execute(
        "INSERT INTO webhook_deliveries (webhook_id, tenant_id, event, payload)"
        " SELECT id, tenant_id, %s, %s FROM webhooks"
        " WHERE tenant_id = %s AND active AND (events = '{}' OR %s = ANY(events))",
        (event, Jsonb(payload), tenant_id, event),
    )
    return cur.rowcount


def deliveries(
    conn: Connection, tenant_id: UUID, webhook_id: UUID, *, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """The endpoint's deliveries, newest first (``status`` None: all)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {_DELIVERY} FROM webhook_deliveries WHERE webhook_id = %s"
            " AND tenant_id = %s AND (%s::text IS NULL OR status = %s)"
            " ORDER BY created_at DESC LIMIT %s",
            (webhook_id, tenant_id, status, status, limit),
        ).fetchall()


def reset_delivery(
    conn: Connection, tenant_id: UUID, webhook_id: UUID, delivery_id: UUID
) -> dict[str, Any] | None:
    """A delivery that is not pending: pending again, attempts cleared, due now."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0,"
            " next_attempt_at = now(), updated_at = now()"
            " WHERE id = %s AND webhook_id = %s AND tenant_id = %s AND status <> 'pending'"
            f" RETURNING {_DELIVERY}",
            (delivery_id, webhook_id, tenant_id),
        ).fetchone()


def delivery_status(
    conn: Connection, tenant_id: UUID, webhook_id: UUID, delivery_id: UUID
) -> str | None:
    row = conn.execute(
        "SELECT status FROM webhook_deliveries WHERE id = %s AND webhook_id = %s"
        " AND tenant_id = %s",
        (delivery_id, webhook_id, tenant_id),
    ).fetchone()
    return str(row[0]) if row is not None else None


def lease_due(conn: Connection, limit: int, *, margin_s: float) -> list[dict[str, Any]]:
    """Lease up to ``limit`` due deliveries (with their endpoint's url, secret and policy) for
    the endpoint's timeout plus ``margin_s``."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "UPDATE webhook_deliveries d"
            " SET next_attempt_at = now() + make_interval(secs => w.timeout_s + %s),"
            " updated_at = now()"
            " FROM webhooks w WHERE w.id = d.webhook_id AND d.id IN ("
            "  SELECT id FROM webhook_deliveries WHERE status = 'pending'"
            "  AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT %s"
            "  FOR UPDATE SKIP LOCKED)"
            " RETURNING d.id, d.event, d.payload, d.attempts, w.id AS webhook_id, w.url,"
            " w.secret, w.active,"
            " w.max_attempts, w.backoff_s, w.timeout_s, w.allow_http",
            (margin_s, limit),
        ).fetchall()


def record_attempt(
    conn: Connection,
    delivery_id: UUID,
    *,
    attempts: int,
    outcome: str,
    status: int | None,
    error: str | None,
    retry_in_s: float,
    delivered: bool,
) -> None:
    conn.execute(
        "UPDATE webhook_deliveries SET attempts = %s, status = %s, last_status = %s,"
        " last_error = %s, updated_at = now(),"
        " next_attempt_at = now() + make_interval(secs => %s),"
        " delivered_at = CASE WHEN %s THEN now() END WHERE id = %s",
        (attempts, outcome, status, error, retry_in_s, delivered, delivery_id),
    )
