"""Connection pool and the one place psycopg's connection errors become ours."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool

from orchestrator.errors import DependencyUnavailable

# How long a request waits for a free connection before the database counts as unavailable.
POOL_TIMEOUT_S = 5.0
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
    pool = ConnectionPool(
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


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn 'cannot reach PostgreSQL' into DependencyUnavailable (503), not a 500."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.errors.ConnectionTimeout) as exc:
        raise DependencyUnavailable("postgresql", type(exc).__name__) from exc
    except Exception as exc:
        from psycopg_pool import PoolTimeout

        if isinstance(exc, PoolTimeout):
            raise DependencyUnavailable("postgresql", "no connection available") from exc
        raise
