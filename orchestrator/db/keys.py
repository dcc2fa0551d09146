"""Tenants and API keys. A key is ``mt_<prefix>_<secret>``; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import Connection
from psycopg.rows import class_row

ROLES = ("uploader", "reviewer", "ml-engineer", "sre", "admin")
_PREFIX_BYTES = 6
_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    key_id: UUID
    tenant_id: UUID
    name: str
    role: str


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


def hash_key(key: str) -> bytes:
    # Keys carry 256 random bits, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(key.encode()).digest()


def ensure_tenant(conn: Connection, name: str) -> UUID:
    row = conn.execute(
        "INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
        " RETURNING id",
        (name,),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def create_key(conn: Connection, *, tenant: str, name: str, role: str) -> tuple[UUID, str]:
    """Create a key and return (id, the key). The key is not recoverable afterwards."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    tenant_id = ensure_tenant(conn, tenant)
    prefix = secrets.token_hex(_PREFIX_BYTES)
    key = f"mt_{prefix}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    row = conn.execute(
        "INSERT INTO api_keys (tenant_id, name, prefix, key_hash, role)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (tenant_id, name, prefix, hash_key(key), role),
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
    return Principal(key_id=row.id, tenant_id=row.tenant_id, name=row.name, role=row.role)
