"""The audit trail is append-only and hash-chained: edits, deletions and gaps are found by
`medtriage audit verify`, even when a superuser switches the guard trigger off."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.settings import ApiSettings
from orchestrator.store.db import upgrade
from orchestrator.store.db.audit import RESOURCE_ID_MAX, query, record, verify

pytestmark = pytest.mark.integration

ADMIN_URL = os.environ.get(
    "MEDTRIAGE_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture()
def fresh_db() -> Iterator[str]:
    """A database of its own: these tests tamper with the chain on purpose."""
    name = f"medtriage_audit_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _write(url: str, n: int, tag: str = "t") -> None:
    with psycopg.connect(url) as conn:
        for i in range(n):
            record(
                conn,
                principal=f"p-{tag}",
                action="study.read",
                resource_type="study",
                resource_id=f"{tag}-{i}",
                outcome="ok",
                detail={"i": i, "score": 0.1 * i, "nested": {"b": [1, 2.5e-7], "a": None}},
            )
            conn.commit()


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEDTRIAGE_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_concurrent_writers_keep_one_linear_chain(fresh_db: str) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda tag: _write(fresh_db, 15, tag), [f"w{i}" for i in range(6)]))
    with psycopg.connect(fresh_db) as conn:
        result = verify(conn)
        seqs = [r[0] for r in conn.execute("SELECT seq FROM audit_log ORDER BY seq")]
    assert result.ok, result
    assert result.rows == 90
    assert seqs == list(range(1, 91))
    done = _cli(fresh_db, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "intact: 90 rows" in done.stdout


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"],
)
def test_changes_refused_even_for_a_superuser(fresh_db: str, statement: str) -> None:
    _write(fresh_db, 2)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 2


def test_application_role_may_append_but_not_change(fresh_db: str) -> None:
    with psycopg.connect(fresh_db) as conn:
        conn.execute("SET ROLE medtriage_app")
        record(conn, principal="app", action="x", resource_type="t", resource_id=None, outcome="ok")
        conn.execute("SELECT count(*) FROM audit_log").fetchone()
        # The application cannot switch the guard off either.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be owner"):
            conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
        conn.rollback()
    with psycopg.connect(fresh_db) as conn:
        # With the trigger off, the GRANTs alone must refuse the change.
        conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
        conn.execute("SET ROLE medtriage_app")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("UPDATE audit_log SET outcome = 'x'")
        conn.rollback()
        conn.execute("SET ROLE medtriage_app")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("DELETE FROM audit_log")
        conn.rollback()


def _tamper(url: str, sql: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
        conn.execute(sql)
        conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update")


def test_edited_row_is_named(fresh_db: str) -> None:
    _write(fresh_db, 10)
    _tamper(fresh_db, "UPDATE audit_log SET principal = 'someone-else' WHERE seq = 7")
    with psycopg.connect(fresh_db) as conn:
        result = verify(conn)
        row_id = conn.execute("SELECT id FROM audit_log WHERE seq = 7").fetchone()[0]
    assert not result.ok
    assert (result.seq, result.row_id, result.rows) == (7, row_id, 6)
    assert "edited" in (result.problem or "")
    done = _cli(fresh_db, "verify")
    assert done.returncode == 2
    assert f"seq 7 (row id {row_id})" in done.stdout


def test_rehashed_edit_breaks_the_next_link(fresh_db: str) -> None:
    _write(fresh_db, 6)
    # A careful attacker also recomputes the edited row's own hash; the next row's link breaks.
    _tamper(
        fresh_db,
        "UPDATE audit_log a SET outcome = 'denied', row_hash = encode(sha256(convert_to("
        "audit_canonical(ROW(a.id, a.at, a.tenant_id, a.principal_id, a.principal, a.action,"
        " a.resource_type, a.resource_id, 'denied', a.request_id, a.source_ip, a.detail, a.seq,"
        " a.prev_hash, a.row_hash)::audit_log) || a.prev_hash, 'UTF8')), 'hex') WHERE seq = 3",
    )
    with psycopg.connect(fresh_db) as conn:
        result = verify(conn)
    assert not result.ok
    assert result.seq == 4 and "broken link" in (result.problem or "")


def test_deleted_row_is_a_gap(fresh_db: str) -> None:
    _write(fresh_db, 8)
    _tamper(fresh_db, "DELETE FROM audit_log WHERE seq = 5")
    with psycopg.connect(fresh_db) as conn:
        result = verify(conn)
    assert not result.ok
    assert result.seq == 6 and "gap" in (result.problem or "")


def test_query_filters_and_pages(fresh_db: str) -> None:
    _write(fresh_db, 5, "a")
    _write(fresh_db, 3, "b")
    with psycopg.connect(fresh_db) as conn:
        rows, total = query(conn, principal="p-b", limit=2)
        assert total == 3 and [r["resource_id"] for r in rows] == ["b-2", "b-1"]
        rows, total = query(conn, principal="p-b", limit=2, offset=2)
        assert [r["resource_id"] for r in rows] == ["b-0"]
        rows, total = query(conn, action="nothing-like-this")
        assert (rows, total) == ([], 0)
    done = _cli(fresh_db, "query", "--principal", "p-a", "--limit", "1")
    assert done.returncode == 0 and '"resource_id": "a-4"' in done.stdout
    assert "1 of 5" in done.stderr


def test_an_oversized_resource_id_is_bounded_and_kept_whole_in_detail(fresh_db: str) -> None:
    # Over the audit_log_resource btree's 2704 bytes, incompressible: refused unbounded (#24).
    long_id = secrets.token_hex(1860)
    with psycopg.connect(fresh_db) as conn:
        record(
            conn,
            principal="p",
            action="x",
            resource_type="api",
            resource_id=long_id,
            outcome="ok",
            detail={"k": 1},
        )
        conn.commit()
        rows, _ = query(conn, action="x")
        assert verify(conn).ok
    (row,) = rows
    assert len(row["resource_id"]) <= RESOURCE_ID_MAX
    assert row["resource_id"].startswith(long_id[:64])
    assert row["detail"] == {"k": 1, "resource_id": long_id}


def test_a_refused_request_with_a_huge_path_is_audited(
    fresh_db: str, redis_url: str, tmp_path: Path
) -> None:
    settings = ApiSettings(
        database_url=fresh_db,
        redis_url=redis_url,
        queue_prefix=f"audit-{uuid.uuid4().hex[:8]}",
        storage_url=f"file://{tmp_path}",
    )
    path = f"/v1/studies/{secrets.token_hex(2000)}"
    with TestClient(create_app(settings)) as client:
        r = client.get(path, headers={"Authorization": "Bearer mt_nope_nope"})
    assert r.status_code == 401, r.text
    # Refused keys are audited per source and interval, without the path (test_refusals.py);
    # the API flushes the open interval when it stops.
    with psycopg.connect(fresh_db) as conn:
        rows, _ = query(conn, action="authenticate")
    assert [(row["outcome"], row["detail"]["count"]) for row in rows] == [("denied", 1)]
    assert path not in str(rows)
