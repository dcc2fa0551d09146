"""Which PostgreSQL errors are an outage (503 ``DependencyUnavailable``), which a transient
conflict worth a retry (503 ``DependencyBusy``), and which neither: a statement the database
refuses (a value too long for an index, bad data, a violated constraint) is raised as itself,
never reported as "postgresql unavailable" (#24)."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from psycopg import errors as pg
from psycopg_pool import PoolTimeout

from orchestrator.errors import DependencyBusy, DependencyUnavailable
from orchestrator.queue import retry
from orchestrator.store.db import translate_errors


def _raised(exc: BaseException) -> BaseException:
    with pytest.raises(BaseException) as info, translate_errors():
        raise exc
    return info.value


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("server closed the connection unexpectedly"),
        pg.ConnectionTimeout("connection timeout expired"),
        PoolTimeout("couldn't get a connection after 5.00 sec"),
        pg.AdminShutdown("terminating connection due to administrator command"),
        pg.CrashShutdown("terminating connection because of crash of another server process"),
        pg.CannotConnectNow("the database system is starting up"),
        pg.TooManyConnections("sorry, too many clients already"),
        pg.DiskFull("could not extend file"),
        pg.ConnectionFailure("connection failure"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_outage_is_dependency_unavailable(exc: BaseException) -> None:
    out = _raised(exc)
    assert isinstance(out, DependencyUnavailable) and out.__cause__ is exc
    assert out.message.startswith("postgresql unavailable")
    assert retry.is_transient(exc) and retry.is_transient(out)


@pytest.mark.parametrize(
    "exc",
    [
        pg.DeadlockDetected("deadlock detected"),
        pg.SerializationFailure("could not serialize access"),
        pg.LockNotAvailable("could not obtain lock"),
        pg.QueryCanceled("canceling statement due to statement timeout"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_transient_conflict_is_busy_not_unavailable(exc: BaseException) -> None:
    out = _raised(exc)
    assert isinstance(out, DependencyBusy) and not isinstance(out, DependencyUnavailable)
    assert out.http_status == 503 and out.headers["Retry-After"]
    assert "unavailable" not in out.message
    assert retry.is_transient(exc) and retry.is_transient(out)


@pytest.mark.parametrize(
    "exc",
    [
        pg.ProgramLimitExceeded("index row size 3720 exceeds btree version 4 maximum 2704"),
        pg.StatementTooComplex("stack depth limit exceeded"),
        pg.ConfigurationLimitExceeded("out of shared memory"),
        pg.ObjectNotInPrerequisiteState("cannot drop a prepared transaction"),
        pg.StringDataRightTruncation("value too long for type character varying(64)"),
        psycopg.DataError("invalid input syntax for type uuid"),
        pg.UniqueViolation("duplicate key value violates unique constraint"),
        psycopg.IntegrityError("null value in column violates not-null constraint"),
        pg.UndefinedTable("relation does not exist"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_refused_statement_is_raised_as_itself(exc: BaseException) -> None:
    assert _raised(exc) is exc
    assert not retry.is_transient(exc)


@pytest.mark.integration
def test_an_oversized_index_row_from_postgresql_is_not_an_outage(database_url: str) -> None:
    # The failure of #24, from the real server: a resource_id over the btree's 2704 bytes
    # (``record`` now bounds it; a plain INSERT does not).
    with psycopg.connect(database_url) as conn:
        with pytest.raises(pg.ProgramLimitExceeded), translate_errors():
            conn.execute(
                "INSERT INTO audit_log (principal, action, resource_type, resource_id, outcome)"
                " VALUES ('test', 'test.oversized', 'study', %s, 'ok')",
                (secrets.token_hex(1860),),  # 3720 bytes, incompressible
            )
        conn.rollback()
