"""The audit rewrite of issue 16 (item 4): the database owner switches the guard trigger
off, deletes a row, renumbers and recomputes the unkeyed SHA-256 chain. The chain alone then
verifies; the HMAC-keyed anchors in the object store (a key the database never sees) do
not, and `medtriage audit verify` exits 2 naming the anchor."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.security import anchors
from orchestrator.store.db.audit import verify
from orchestrator.store.objects import open_store

from .test_audit import _write, fresh_db  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

KEY = secrets.token_hex(32)

# What the attacker runs as the owner: delete seq 5, renumber, re-chain every row after it.
REWRITE = """
ALTER TABLE audit_log DISABLE TRIGGER USER;
DELETE FROM audit_log WHERE seq = 5;
UPDATE audit_log SET seq = seq - 1 WHERE seq > 5;
DO $$
DECLARE r audit_log; h text := repeat('0', 64);
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY seq LOOP
        r.prev_hash := h;
        r.row_hash := encode(sha256(convert_to(audit_canonical(r) || h, 'UTF8')), 'hex');
        UPDATE audit_log SET prev_hash = r.prev_hash, row_hash = r.row_hash WHERE id = r.id;
        h := r.row_hash;
    END LOOP;
END $$;
ALTER TABLE audit_log ENABLE TRIGGER USER;
"""


def _store(tmp_path: Path) -> Any:
    return open_store(f"file://{tmp_path / 'objects'}")


def _cli(url: str, objects: Path, *args: str, key: str = KEY) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MEDTRIAGE_DATABASE_URL": url,
        "MEDTRIAGE_STORAGE_URL": f"file://{objects}",
        "MEDTRIAGE_AUDIT_ANCHOR_KEY": key,
    }
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_recomputed_chain_disagrees_with_the_anchors(fresh_db: str, tmp_path: Path) -> None:  # noqa: F811
    _write(fresh_db, 8)
    assert _cli(fresh_db, tmp_path / "objects", "anchor").returncode == 0
    _write(fresh_db, 4, "later")
    done = _cli(fresh_db, tmp_path / "objects", "anchor")
    assert done.returncode == 0 and "anchor 2: seq 12" in done.stdout, done.stdout + done.stderr
    ok = _cli(fresh_db, tmp_path / "objects", "verify")
    assert ok.returncode == 0 and "12 rows, 2 anchors agree" in ok.stdout, ok.stdout + ok.stderr

    with psycopg.connect(fresh_db) as conn:
        conn.execute(REWRITE)
        conn.commit()
        # The unkeyed chain alone cannot tell (the finding).
        assert verify(conn).ok
        check = anchors.verify(conn, _store(tmp_path), KEY)
    assert not check.ok
    assert "anchor 1: row seq 8 has another hash" in (check.problem or "")
    done = _cli(fresh_db, tmp_path / "objects", "verify")
    assert done.returncode == 2
    assert "AUDIT CHAIN BROKEN: anchor 1" in done.stdout


def test_forged_missing_and_truncated_anchors_are_found(fresh_db: str, tmp_path: Path) -> None:  # noqa: F811
    store = _store(tmp_path)
    _write(fresh_db, 3)
    with psycopg.connect(fresh_db) as conn:
        first = anchors.write(conn, store, KEY)
        assert first is not None and (first.n, first.seq) == (1, 3)
        assert anchors.write(conn, store, KEY) is None  # nothing new
    _write(fresh_db, 2)
    with psycopg.connect(fresh_db) as conn:
        second = anchors.write(conn, store, KEY)
        assert second is not None and second.prev_mac == first.mac
        assert anchors.verify(conn, store, KEY).ok
        # Without the key nobody can make an anchor that passes.
        assert not anchors.verify(conn, store, secrets.token_hex(32)).ok
        # An anchor re-pointed at a rewritten head, its MAC left as it was.
        forged = {**json.loads(store.get(anchors.object_key(2))), "row_hash": "f" * 64}
        store.put(anchors.object_key(2), json.dumps(forged).encode())
        assert "MAC does not match" in (anchors.verify(conn, store, KEY).problem or "")
        # An anchor deleted from the store (no Object Lock): the index names it.
        store.delete(anchors.object_key(2))
        assert "anchor 2 is missing" in (anchors.verify(conn, store, KEY).problem or "")
    # The tail of the chain deleted past an anchor.
    with psycopg.connect(fresh_db) as conn:
        conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        conn.execute("DELETE FROM audit_log WHERE seq >= 3")
        conn.commit()
        assert verify(conn).ok
        assert "row seq 3 is gone" in (anchors.verify(conn, store, KEY).problem or "")


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        anchors.Anchorer(None, _store(tmp_path), "short", 60)  # type: ignore[arg-type]
