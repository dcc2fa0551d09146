"""Anchors of the audit chain outside PostgreSQL, keyed (issue 16).

The chain in ``audit_log`` (``db/audit.py``) is SHA-256 over each row and the one before, so
whoever can switch its guard trigger off (the database owner) can delete a row and recompute
every hash after it. An anchor records the chain's head (``seq``, ``row_hash``) in the object
store, MACed with HMAC-SHA256 under ``MEDTRIAGE_AUDIT_ANCHOR_KEY``: a key the database never
sees. Anchors are numbered and each carries the MAC of the one before, so one missing from
the middle is found. ``verify`` checks every anchor's MAC and that the row at its ``seq``
still has its ``row_hash``: a rewritten or shortened chain disagrees with every anchor written
after the change. On S3, put the bucket (or the ``audit/anchors/`` prefix) under Object Lock
(compliance mode) so anchors cannot be deleted either; ``audit_anchors`` in the database is
only an index of what was written.

The API writes one every ``audit_anchor_interval_s`` while rows arrive; `medtriage audit
anchor` writes one now, `medtriage audit verify` checks them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import Connection
from psycopg_pool import ConnectionPool

from orchestrator.store.objects import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "audit/anchors/"
KEY_SETTING = "MEDTRIAGE_AUDIT_ANCHOR_KEY"
# A shorter key is refused: the MAC is only as strong as it.
MIN_KEY_CHARS = 32
# Serialises anchor writers (API processes) so numbers stay dense.
_LOCK_ID = 0x616E6368  # "anch"


@dataclass(frozen=True)
class Anchor:
    n: int
    seq: int
    row_hash: str
    at: str
    prev_mac: str
    mac: str = ""


def _key(text: str) -> bytes:
    if len(text) < MIN_KEY_CHARS:
        raise ValueError(f"{KEY_SETTING} must be at least {MIN_KEY_CHARS} characters")
    return text.encode()


def _mac(key: bytes, a: Anchor) -> str:
    message = json.dumps([a.n, a.seq, a.row_hash, a.at, a.prev_mac]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def object_key(n: int) -> str:
    return f"{PREFIX}{n:012d}.json"


def _load(store: ObjectStore, n: int) -> Anchor:
    return Anchor(**json.loads(store.get(object_key(n))))


def write(conn: Connection, store: ObjectStore, key_text: str) -> Anchor | None:
    """Anchor the chain's head now; None when nothing was added since the last anchor."""
    key = _key(key_text)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        head = conn.execute(
            "SELECT seq, row_hash, to_char(now() AT TIME ZONE 'UTC',"
            ' \'YYYY-MM-DD"T"HH24:MI:SS"Z"\') FROM audit_log ORDER BY seq DESC LIMIT 1'
        ).fetchone()
        if head is None:
            return None
        last = conn.execute("SELECT n, seq FROM audit_anchors ORDER BY n DESC LIMIT 1").fetchone()
        if last is not None and int(last[1]) == int(head[0]):
            return None
        n = int(last[0]) + 1 if last else 1
        prev_mac = _load(store, n - 1).mac if last else ""
        anchor = Anchor(n, int(head[0]), str(head[1]), str(head[2]), prev_mac)
        anchor = Anchor(**{**asdict(anchor), "mac": _mac(key, anchor)})
        store.put(
            object_key(n), json.dumps(asdict(anchor)).encode(), content_type="application/json"
        )
        conn.execute(
            "INSERT INTO audit_anchors (n, seq, row_hash) VALUES (%s, %s, %s)",
            (n, anchor.seq, anchor.row_hash),
        )
    return anchor


@dataclass(frozen=True)
class AnchorCheck:
    ok: bool
    anchors: int
    problem: str | None = None


def verify(conn: Connection, store: ObjectStore, key_text: str) -> AnchorCheck:
    """Check every anchor in the store against the chain in ``conn``; name the first
    disagreement."""
    key = _key(key_text)
    n, prev_mac = 1, ""
    while store.exists(object_key(n)):
        a = _load(store, n)
        if a.n != n or not hmac.compare_digest(a.mac, _mac(key, a)):
            return AnchorCheck(False, n - 1, f"anchor {n}: MAC does not match (forged or edited)")
        if a.prev_mac != prev_mac:
            return AnchorCheck(False, n - 1, f"anchor {n}: not linked to anchor {n - 1}")
        row = conn.execute("SELECT row_hash FROM audit_log WHERE seq = %s", (a.seq,)).fetchone()
        if row is None:
            return AnchorCheck(
                False, n - 1, f"anchor {n}: row seq {a.seq} is gone (audit rows deleted)"
            )
        if row[0] != a.row_hash:
            return AnchorCheck(
                False,
                n - 1,
                f"anchor {n}: row seq {a.seq} has another hash than anchored at {a.at}"
                " (the chain was rewritten at or before it)",
            )
        n, prev_mac = n + 1, a.mac
    indexed = conn.execute("SELECT coalesce(max(n), 0) FROM audit_anchors").fetchone()
    if indexed is not None and int(indexed[0]) >= n:
        return AnchorCheck(
            False, n - 1, f"anchor {n} is missing from the object store (anchors deleted)"
        )
    return AnchorCheck(True, n - 1)


class Anchorer:
    """A daemon thread writing an anchor every ``interval_s`` (and one when stopped)."""

    def __init__(
        self, pool: ConnectionPool, store: ObjectStore, key_text: str, interval_s: float
    ) -> None:
        _key(key_text)
        self._args = (pool, store, key_text)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audit-anchor", daemon=True)

    def start(self) -> Anchorer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s * 2)
        self._once()

    def _once(self) -> None:
        pool, store, key_text = self._args
        try:
            with pool.connection() as conn:
                write(conn, store, key_text)
        except Exception as exc:  # noqa: BLE001 - a dependency down: anchor next time
            log.warning("audit anchor not written (next try in %.0fs): %s", self._interval_s, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._once()


def from_settings(settings: Any, pool: ConnectionPool, store: ObjectStore) -> Anchorer | None:
    if not settings.audit_anchor_key:
        return None
    return Anchorer(pool, store, settings.audit_anchor_key, settings.audit_anchor_interval_s)
