"""Connection pool and the one place psycopg's errors are sorted: outage, busy, or neither.

The pool is a circuit breaker (``BreakerPool``): after an outage (no connection within the
timeout, or a connection found broken) a checkout waits at most ``OPEN_TIMEOUT_S`` instead
of ``POOL_TIMEOUT_S``, so while PostgreSQL is down requests answer 503 within about a second
instead of five (clients with a 5 s timeout got no answer at all). The pool keeps
reconnecting in the background; the first checkout that gets a connection closes the
circuit again, so recovery needs nobody.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from orchestrator.errors import DependencyBusy, DependencyUnavailable

# How long a request waits for a free connection before the database counts as unavailable.
POOL_TIMEOUT_S = 5.0
# While the circuit is open (PostgreSQL failed lately), a checkout waits at most this long.
OPEN_TIMEOUT_S = 0.5
# Per-connection timeout when opening a new connection.
CONNECT_TIMEOUT_S = 5
# A pooled connection is checked (one round trip) before it is handed out only when it has
# not been checked for this long. Checking on every checkout cost a round trip per
# checkout, ~15 per study (benchmarks/README.md); a connection broken within this window
# fails its operation, which callers already treat as transient (503, or a step retry).
CHECK_AFTER_S = 1.0


def _throttled_check(after_s: float) -> Callable[[psycopg.Connection], None]:
    checked: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()

    def check(conn: psycopg.Connection) -> None:
        now = time.monotonic()
        if now - checked.get(conn, float("-inf")) < after_s:
            return
        ConnectionPool.check_connection(conn)
        checked[conn] = now

    return check


class BreakerPool(ConnectionPool):
    """A ``ConnectionPool`` that stops waiting long for connections while PostgreSQL is down."""

    def __init__(self, *args: Any, open_timeout_s: float = OPEN_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_timeout_s = open_timeout_s
        # One flag, read and written whole by many threads: no lock needed.
        self.circuit_open = False

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        if self.circuit_open:
            wait = self.timeout if timeout is None else timeout
            timeout = min(wait, self.open_timeout_s)
        try:
            conn = super().getconn(timeout=timeout)
        except psycopg.Error as exc:
            if is_outage(exc):
                self.circuit_open = True
            raise
        self.circuit_open = False
        return conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        if conn.broken:  # lost mid-use: the server went away
            self.circuit_open = True
        super().putconn(conn)


def connect_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    check_after_s: float = CHECK_AFTER_S,
    synchronous_commit: bool = True,
) -> ConnectionPool:
    """Open a pool without waiting: the API must start (and say 'not ready') while the DB is down.

    ``synchronous_commit=False`` lets commits return before the WAL flush (a server crash may
    lose the last ones). Only the workers may opt in (``worker_synchronous_commit``); what the
    API accepts is always committed durably.
    """
    kwargs: dict[str, object] = {"connect_timeout": CONNECT_TIMEOUT_S, "autocommit": False}
    if not synchronous_commit:
        kwargs["options"] = "-c synchronous_commit=off"
    pool = BreakerPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=POOL_TIMEOUT_S,
        kwargs=kwargs,
        open=False,
        # A connection dropped by a server restart is replaced instead of handed out broken.
        check=_throttled_check(check_after_s),
    )
    pool.open(wait=False)
    return pool


# What a psycopg error means, by its SQLSTATE (PostgreSQL documentation, Appendix A). psycopg
# files classes 53-58 and 40 all under OperationalError, though most of them are neither an
# outage nor transient: "index row size exceeds btree maximum" (54000) is OperationalError.
#
# An outage: the server cannot serve this connection now. Class 08 connection exception,
# class 53 insufficient resources (disk full, out of memory, too many connections), class 58
# system error (I/O), and the shutdown / start-up states of class 57. An error the client
# raised itself (no SQLSTATE: connection refused or lost, connect or pool timeout) is one too.
_OUTAGE_CLASSES = frozenset({"08", "53", "58"})
_OUTAGE_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})
# In class 53 but a limit of this statement (max_locks_per_transaction), not of the server.
_NOT_OUTAGE_STATES = frozenset({"53400"})
# Transient but not an outage: the same statement may succeed unchanged a moment later.
# Class 40 transaction rollback (deadlock, serialization failure), lock_not_available,
# query_canceled (a statement or lock timeout).
_BUSY_CLASSES = frozenset({"40"})
_BUSY_STATES = frozenset({"55P03", "57014"})


def is_outage(exc: BaseException) -> bool:
    """PostgreSQL is down or unreachable for this connection (503, readiness fails)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    if state is None:
        return True
    if state in _NOT_OUTAGE_STATES:
        return False
    return state[:2] in _OUTAGE_CLASSES or state in _OUTAGE_STATES


def is_busy(exc: BaseException) -> bool:
    """PostgreSQL is up but refused this statement for now; retrying it is right."""
    state = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    return state is not None and (state[:2] in _BUSY_CLASSES or state in _BUSY_STATES)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn 'cannot reach PostgreSQL' into DependencyUnavailable (503), not a 500, and a
    deadlock or timeout into DependencyBusy (503, retry). Any other database error (a value
    over an index's limit, bad data, a violated constraint) is raised as itself: it is a
    fault of the statement, and reporting it as an outage would hide it."""
    try:
        yield
    except psycopg.Error as exc:
        if is_outage(exc):
            why = "no connection available" if isinstance(exc, PoolTimeout) else type(exc).__name__
            raise DependencyUnavailable("postgresql", why) from exc
        if is_busy(exc):
            raise DependencyBusy("postgresql", type(exc).__name__) from exc
        raise


def ping(conn: psycopg.Connection) -> None:
    """One round trip: the readiness probe's proof that PostgreSQL answers."""
    conn.execute("SELECT 1")
