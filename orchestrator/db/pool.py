"""Connection pool and the one place psycopg's connection errors become ours."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool

from orchestrator.errors import DependencyUnavailable

# How long a request waits for a free connection before the database counts as unavailable.
POOL_TIMEOUT_S = 5.0
# Per-connection timeout when opening a new connection.
CONNECT_TIMEOUT_S = 5


def connect_pool(url: str, *, min_size: int = 1, max_size: int = 8) -> ConnectionPool:
    """Open a pool without waiting: the API must start (and say 'not ready') while the DB is down."""
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=POOL_TIMEOUT_S,
        kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "autocommit": False},
        open=False,
        # A connection dropped by a server restart is replaced instead of handed out broken.
        check=ConnectionPool.check_connection,
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
