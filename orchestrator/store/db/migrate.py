"""Numbered SQL migrations in ``migrations/NNNN_name.sql``, applied in order, each once.

Run by the schema's owner (`medtriage db upgrade`). The API and workers run as a member of
``medtriage_app`` (no DDL right) and call ``upgrade`` at start too: with nothing pending it
needs no more than SELECT on ``schema_migrations``."""

from __future__ import annotations

from importlib import resources

import psycopg

# Serialises concurrent upgrades (API and workers starting together).
_ADVISORY_LOCK_ID = 0x6D656474  # "medt"


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("orchestrator.store.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql"):
            found.append((int(name.split("_", 1)[0]), name, entry.read_text()))
    return sorted(found)


def upgrade(url: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    applied: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_ID,))
        try:
            exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
            if exists is None or exists[0] is None:
                conn.execute(
                    "CREATE TABLE schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                with conn.transaction():
                    try:
                        conn.execute(sql.encode())
                    except psycopg.errors.InsufficientPrivilege as exc:
                        raise PermissionError(
                            f"migration {name} needs the schema owner: run `medtriage db"
                            " upgrade` with the owner's MEDTRIAGE_DATABASE_URL first"
                        ) from exc
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_ID,))
    return applied


def current_version(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0
