"""Idempotency keys: the first answer to a request, replayed for retries (per tenant).

When retention purges a study, the answers that name it are replaced by a tombstone
(``forget_study``) that keeps nothing of the upload: a retry under the same key is then told
the upload was purged (410 Gone, ``purged``) rather than "accepted" for a study that no
longer exists, and may send it again under a new key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.types.json import Jsonb

# The tombstone a purged upload's key answers with (until the key's TTL runs out).
PURGED_STATUS = 410
PURGED_ERROR = "UploadPurged"
PURGED_DETAIL = (
    "the upload sent under this Idempotency-Key was deleted by its tenant's retention policy;"
    " nothing of it is kept. Send it again under a new Idempotency-Key to store it anew"
)


@dataclass(frozen=True)
class Claim:
    # True: this request owns the key and must answer (then complete or release it).
    owner: bool
    request_sha256: str
    status_code: int | None = None
    response: Any = None
    route: str = ""


def claim(
    conn: Connection,
    *,
    tenant_id: UUID,
    key: str,
    route: str,
    request_sha256: str,
    ttl_s: int,
    pending_timeout_s: int,
) -> Claim:
    """Take the key for this request, or return what the first request with it answered.

    Keys older than ``ttl_s`` are forgotten; a claim whose request has not answered within
    ``pending_timeout_s`` (the process died) may be taken over.
    """
    conn.execute(
        "DELETE FROM idempotency_keys WHERE tenant_id = %s AND key = %s"
        " AND (created_at < now() - make_interval(secs => %s)"
        "      OR (status_code IS NULL AND created_at < now() - make_interval(secs => %s)))",
        (tenant_id, key, ttl_s, pending_timeout_s),
    )
    row = conn.execute(
        "INSERT INTO idempotency_keys (tenant_id, key, route, request_sha256)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, key) DO NOTHING RETURNING key",
        (tenant_id, key, route, request_sha256),
    ).fetchone()
    if row is not None:
        conn.commit()
        return Claim(owner=True, request_sha256=request_sha256)
    existing = conn.execute(
        "SELECT route, request_sha256, status_code, response FROM idempotency_keys"
        " WHERE tenant_id = %s AND key = %s",
        (tenant_id, key),
    ).fetchone()
    conn.commit()
    if existing is None:  # deleted between the two statements: try once more
        return claim(
            conn,
            tenant_id=tenant_id,
            key=key,
            route=route,
            request_sha256=request_sha256,
            ttl_s=ttl_s,
            pending_timeout_s=pending_timeout_s,
        )
    return Claim(
        owner=False,
        route=existing[0],
        request_sha256=existing[1],
        status_code=existing[2],
        response=existing[3],
    )


def complete(
    conn: Connection, *, tenant_id: UUID, key: str, status_code: int, response: Any
) -> None:
    conn.execute(
        "UPDATE idempotency_keys SET status_code = %s, response = %s, completed_at = now()"
        " WHERE tenant_id = %s AND key = %s",
        (status_code, Jsonb(response), tenant_id, key),
    )
    conn.commit()


def release(conn: Connection, *, tenant_id: UUID, key: str) -> None:
    """Forget an unanswered claim (the request failed transiently; a retry may run again)."""
    conn.execute(
        "DELETE FROM idempotency_keys WHERE tenant_id = %s AND key = %s AND status_code IS NULL",
        (tenant_id, key),
    )
    conn.commit()


def purged(claim: Claim) -> bool:
    """The key's upload was deleted by retention (its answer is the tombstone)."""
    return (
        claim.status_code == PURGED_STATUS
        and isinstance(claim.response, dict)
        and claim.response.get("error") == PURGED_ERROR
    )


def forget_study(conn: Connection, *, tenant_id: UUID, study_id: UUID) -> int:
    """Replace every answer of the tenant that names the study by the purged tombstone (file
    names, UIDs and the request's fingerprint go); returns how many keys it touched."""
    return conn.execute(
        "UPDATE idempotency_keys SET status_code = %s, response = %s, request_sha256 = '',"
        " completed_at = now() WHERE tenant_id = %s AND strpos(response::text, %s) > 0",
        (
            PURGED_STATUS,
            Jsonb({"error": PURGED_ERROR, "detail": PURGED_DETAIL}),
            tenant_id,
            str(study_id),
        ),
    ).rowcount
