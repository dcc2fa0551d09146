"""The application runs as a least-privilege login role (issue 16, item 4): a member of
``medtriage_app`` (INSERT/SELECT on the audit, no DDL) starts the API, serves and audits
requests, and cannot switch the audit's guard off; migrations stay with the owner
(`medtriage db upgrade`, run as the owner first)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.api.deps import refused_keys
from orchestrator.settings import ApiSettings
from orchestrator.store.db import upgrade
from tests.conftest import ADMIN_DATABASE_URL

pytestmark = pytest.mark.integration


@pytest.fixture()
def app_url(database_url: str) -> Iterator[str]:
    """A login role of the application's (roles are cluster-wide: a name of its own)."""
    role = f"medtriage_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE medtriage_app")
    yield database_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_the_app_runs_as_the_application_role(
    app_url: str, settings_env: dict[str, str], make_key: Any
) -> None:
    with psycopg.connect(app_url) as conn:
        assert not conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()[0]
    # Start-up's upgrade finds nothing to do and needs no DDL right.
    assert upgrade(app_url) == []
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    fields.update(database_url=app_url, queue_prefix=f"lp-{uuid.uuid4().hex[:8]}")
    key = make_key("uploader", tenant="tenant-least-privilege")
    with TestClient(create_app(ApiSettings(**fields))) as api:
        assert api.get("/readyz").status_code == 200, api.get("/readyz").text
        r = api.get("/v1/studies", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert (
            api.get(
                f"/v1/studies/{uuid.uuid4()}", headers={"Authorization": f"Bearer {key}"}
            ).status_code
            == 404
        )
        assert (
            api.get("/v1/studies", headers={"Authorization": "Bearer mt_0_no"}).status_code == 401
        )
        services = api.app.state.services  # type: ignore[attr-defined]
        refused_keys(services).flush(services.pool, force=True)
    with psycopg.connect(app_url) as conn:
        for statement, error in (
            ("ALTER TABLE audit_log DISABLE TRIGGER USER", "must be owner"),
            ("UPDATE audit_log SET outcome = 'x'", "append-only|permission denied"),
            ("CREATE TABLE mine (x int)", "permission denied"),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=error):
                conn.execute(statement)
            conn.rollback()
