"""Session-wide real services: a fresh PostgreSQL database, Redis, Triton and the stack.

Each server starts once per test session. PostgreSQL and Redis are the machine's own
(127.0.0.1:5432 / :6379); a missing one is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.settings import REPO_ROOT

ADMIN_DATABASE_URL = os.environ.get(
    "MEDTRIAGE_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("MEDTRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HOME = Path(os.environ.get("MEDTRIAGE_HOME", str(REPO_ROOT / ".medtriage")))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"medtriage_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
    from orchestrator.store.db import upgrade

    upgrade(url)
    yield url
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    from redis import Redis

    Redis.from_url(REDIS_URL).ping()
    return REDIS_URL


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    return f"medtriage-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real tritonserver serving the real model_repository, rendered for the CPU."""
    from orchestrator.inference.local_triton.install import install_runtime
    from orchestrator.inference.local_triton.process import TritonProcess
    from orchestrator.inference.local_triton.render import render_repository
    from orchestrator.inference.specs import load_repository

    install_runtime(HOME)
    work = tmp_path_factory.mktemp("triton")
    rendered = render_repository(REPO_ROOT / "model_repository", work / "repository")
    proc = TritonProcess(
        HOME,
        rendered,
        work / "triton.log",
        model_control="explicit",
        load_models=sorted(load_repository(REPO_ROOT / "model_repository")),
    )
    proc.start(timeout_s=180)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("objects")


@pytest.fixture(scope="session")
def settings_env(
    database_url: str, redis_url: str, queue_prefix: str, storage_dir: Path, triton: object
) -> dict[str, str]:
    return {
        "MEDTRIAGE_DATABASE_URL": database_url,
        "MEDTRIAGE_REDIS_URL": redis_url,
        "MEDTRIAGE_QUEUE_PREFIX": queue_prefix,
        "MEDTRIAGE_STORAGE_URL": f"file://{storage_dir}",
        "MEDTRIAGE_TRITON_GRPC_URL": triton.grpc_url,  # type: ignore[attr-defined]
        "MEDTRIAGE_TRITON_HTTP_URL": triton.http_url,  # type: ignore[attr-defined]
        "MEDTRIAGE_HOME": str(HOME),
        # Functional tests poll many studies at once through one key; the per-key limiter
        # has its own test (test_jwt.py) with tight limits.
        "MEDTRIAGE_RATE_LIMIT_PER_S": "1000",
        "MEDTRIAGE_RATE_LIMIT_BURST": "5000",
        # Every test's refused keys come from 127.0.0.1; the per-source limit before
        # authentication has its own test (test_refusals.py) with tight limits.
        "MEDTRIAGE_AUTH_FAILURE_BURST": "100000",
        # Webhook receivers and PACS (Orthanc) of the tests listen on loopback; the SSRF
        # guard refuses loopback unless allowed (test_outbound.py checks it without this).
        "MEDTRIAGE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
    }


@pytest.fixture(scope="session")
def stack(settings_env: dict[str, str], triton: object) -> Iterator[object]:
    """API + one worker as real processes (the CLI entry points), sharing the session Triton."""
    from orchestrator.cli.stack import LocalStack
    from orchestrator.settings import CliSettings

    old = dict(os.environ)
    os.environ.update(settings_env)
    try:
        settings = CliSettings(port=0)
        local = LocalStack(settings, workers=1)
        local.triton = triton  # type: ignore[assignment]
        local.start()
        local.wait_workers_ready(settings.redis_url)
        yield local
        local.triton = None  # the session fixture stops Triton itself
        local.stop()
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.fixture(scope="session")
def make_key(database_url: str):  # type: ignore[no-untyped-def]
    from orchestrator.store.db.keys import create_key

    def _make(role: str, tenant: str = "tenant-a") -> str:
        with psycopg.connect(database_url) as conn:
            return create_key(conn, tenant=tenant, name=f"test-{role}", role=role)[1]

    return _make
