"""Tenants and API keys. A key is ``mt_<prefix>_<secret>``; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import class_row, dict_row

TENANT_ROLES = ("uploader", "reviewer", "ml-engineer", "sre", "admin")
# Platform roles act on what every tenant shares (model routes, shadows, thresholds, the
# versions loaded in Triton) and on nothing of any tenant's patients. Their keys live in
# the reserved tenant PLATFORM_TENANT by default (`medtriage keys create --role platform-...`).
PLATFORM_ROLES = ("platform-ml-engineer", "platform-admin")
ROLES = TENANT_ROLES + PLATFORM_ROLES
PLATFORM_TENANT = "platform"
_PREFIX_BYTES = 6
_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    # The API key's id, or a stable per-person id for bearer tokens (audit principal_id).
    key_id: UUID
    tenant_id: UUID
    name: str
    role: str
    # "key" (integration clients, services) or "person" (OIDC bearer token).
    kind: str = "key"
    # Roles added by an active break-glass grant (audited on every use).
    extra_roles: tuple[str, ...] = ()

    def has_any(self, roles: set[str]) -> bool:
        return self.role in roles or bool(roles.intersection(self.extra_roles))

    @property
    def platform(self) -> bool:
        return self.role in PLATFORM_ROLES


@dataclass(frozen=True)
class _KeyRow:
    id: UUID
    tenant_id: UUID
    name: str
    role: str
    key_hash: bytes
    expires_at: datetime | None
    revoked_at: datetime | None
    expired: bool


# How stale api_keys.last_used_at may be.
LAST_USED_RESOLUTION_S = 60


def hash_key(key: str) -> bytes:
    # Keys carry 256 random bits, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(key.encode()).digest()


def tenant_id(conn: Connection, name: str) -> UUID | None:
    row = conn.execute("SELECT id FROM tenants WHERE name = %s", (name,)).fetchone()
    return UUID(str(row[0])) if row else None


def ensure_tenant(conn: Connection, name: str) -> UUID:
    row = conn.execute(
        "INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
        " RETURNING id",
        (name,),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def create_key(
    conn: Connection,
    *,
    tenant: str,
    name: str,
    role: str,
    expires_in: timedelta | None = None,
) -> tuple[UUID, str]:
    """Create a key and return (id, the key). The key is not recoverable afterwards."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if expires_in is not None and expires_in <= timedelta(0):
        raise ValueError("expires_in must be positive")
    tenant_id = ensure_tenant(conn, tenant)
    prefix = secrets.token_hex(_PREFIX_BYTES)
    key = f"mt_{prefix}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    row = conn.execute(
        "INSERT INTO api_keys (tenant_id, name, prefix, key_hash, role, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, now() + %s) RETURNING id",
        (tenant_id, name, prefix, hash_key(key), role, expires_in),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0])), key


def authenticate(conn: Connection, key: str) -> Principal | None:
    """Return the principal for a valid, unrevoked, unexpired key, else None."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "mt":
        return None
    with conn.cursor(row_factory=class_row(_KeyRow)) as cur:
        row = cur.execute(
            "SELECT id, tenant_id, name, role, key_hash, expires_at, revoked_at,"
            " (expires_at IS NOT NULL AND expires_at <= now()) AS expired"
            " FROM api_keys WHERE prefix = %s",
            (parts[1],),
        ).fetchone()
    if row is None or not hmac.compare_digest(bytes(row.key_hash), hash_key(key)):
        return None
    if row.revoked_at is not None or row.expired:
        return None
    # last_used_at is kept to the minute: writing it on every request made one hot row that
    # every request of a busy key queued on (benchmarks/README.md). A non-matching UPDATE
    # takes no row lock.
    conn.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE id = %s AND"
        " (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => %s))",
        (row.id, LAST_USED_RESOLUTION_S),
    )
    return Principal(key_id=row.id, tenant_id=row.tenant_id, name=row.name, role=row.role)


def list_keys(conn: Connection, *, tenant: str | None = None) -> list[dict[str, Any]]:
    """Every key's public facts (never the hash): id, tenant, name, prefix, role, dates."""
    sql = (
        "SELECT k.id, t.name AS tenant, k.name, k.prefix, k.role, k.created_at, k.expires_at,"
        " k.revoked_at, k.last_used_at FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
    )
    params: tuple[Any, ...] = ()
    if tenant is not None:
        sql += " WHERE t.name = %s"
        params = (tenant,)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql + " ORDER BY k.created_at, k.id", params).fetchall()


def revoke_key(conn: Connection, key: str) -> bool:
    """Revoke by id or prefix; return whether a live key was revoked."""
    try:
        where, value = "id = %s", str(UUID(key))
    except ValueError:
        where, value = "prefix = %s", key
    row = conn.execute(
        f"UPDATE api_keys SET revoked_at = now() WHERE {where} AND revoked_at IS NULL RETURNING id",
        (value,),
    ).fetchone()
    return row is not None


def parse_duration(text: str) -> timedelta:
    """'90d', '12h', '30m', '45s' → timedelta (for --expires-in)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"duration {text!r}: write a number and a unit, e.g. 90d, 12h, 30m")
    return timedelta(seconds=int(text[:-1]) * units[text[-1]])
