"""The pool's circuit breaker (issue 16, item 8) on the real PostgreSQL, made unreachable by a
TCP proxy in front of it (the shared server itself is never stopped): once an outage is
seen, checkouts fail within OPEN_TIMEOUT_S instead of POOL_TIMEOUT_S, and the pool works
again by itself when the server is reachable."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from orchestrator.errors import DependencyUnavailable
from orchestrator.store.db import connect_pool, translate_errors
from orchestrator.store.db.pool import OPEN_TIMEOUT_S, POOL_TIMEOUT_S
from tests.chaos import TcpProxy

PROBES = 5
# Scheduling slack on a loaded 2-core machine, beyond OPEN_TIMEOUT_S.
SLACK_S = 0.4
RECOVER_TIMEOUT_S = 15.0


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    port = int(conninfo_to_dict(database_url).get("port") or 5432)
    proxy = TcpProxy(port).up()
    yield proxy
    proxy.down()


@pytest.fixture
def pool(database_url: str, proxy: TcpProxy) -> Iterator[ConnectionPool]:
    url = make_conninfo(database_url, host="127.0.0.1", port=proxy.port)
    pool = connect_pool(url, min_size=1, max_size=2)
    pool.wait(10)
    yield pool
    pool.close()


def _checkout(pool: ConnectionPool) -> float:
    """Seconds until one checkout (and a SELECT) failed with DependencyUnavailable."""
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable), translate_errors(), pool.connection() as conn:
        conn.execute("SELECT 1")
    return time.monotonic() - started


def test_checkouts_fail_fast_while_postgres_is_unreachable(
    pool: ConnectionPool, proxy: TcpProxy
) -> None:
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    proxy.down()
    first = _checkout(pool)  # finds out: the broken connection, or the full wait
    assert first < POOL_TIMEOUT_S + SLACK_S
    waits = [_checkout(pool) for _ in range(PROBES)]
    assert max(waits) < OPEN_TIMEOUT_S + SLACK_S, waits


def test_the_pool_recovers_by_itself(pool: ConnectionPool, proxy: TcpProxy) -> None:
    proxy.down()
    _checkout(pool)
    _checkout(pool)
    proxy.up()
    deadline = time.monotonic() + RECOVER_TIMEOUT_S
    while True:
        try:
            with translate_errors(), pool.connection() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            break
        except DependencyUnavailable:
            assert time.monotonic() < deadline, "pool did not recover"
            time.sleep(0.1)
    assert not getattr(pool, "circuit_open", False)
    # Closed again: a checkout may wait the full timeout once more (none needed here).
    with pool.connection() as conn:
        conn.execute("SELECT 1")
