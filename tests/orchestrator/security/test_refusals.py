"""Refusals (issue 16, items 5 and 6), over the real PostgreSQL and Redis:

* a per-source limit before authentication: a source that keeps presenting bad keys gets
  429 without a key lookup, other sources are untouched;
* refused keys audited in aggregate: one row per source per interval, with a count, not a
  chained row per request;
* refused access by a signed-in caller (another tenant's id answering 404, a role's 403)
  audited, PHI-free: the route's template and opaque ids, never a DICOM UID.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.api.deps import refused_keys
from orchestrator.settings import ApiSettings

pytestmark = pytest.mark.integration

BAD = {"Authorization": "Bearer mt_000000000000_nope"}


def _fields(settings_env: dict[str, str], **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()
    }
    # Own Redis keys: the buckets and counts of this test alone.
    fields["queue_prefix"] = f"refusals-{uuid.uuid4().hex[:8]}"
    return {**fields, **extra}


def _denied_rows(database_url: str, source: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT detail FROM audit_log WHERE action = 'authenticate' AND outcome = 'denied'"
            " AND source_ip = %s ORDER BY seq",
            (source,),
        ).fetchall()
    return [r[0] for r in rows]


def _flush(api: TestClient) -> None:
    services = api.app.state.services  # type: ignore[attr-defined]
    refused_keys(services).flush(services.pool, force=True)


def test_a_source_is_limited_before_authentication(
    settings_env: dict[str, str], make_key: Any
) -> None:
    fields = _fields(settings_env, auth_failure_burst=5, auth_failure_rate_per_s=0.01)
    good = {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-flood')}"}
    app = create_app(ApiSettings(**fields))
    with TestClient(app, client=("198.51.100.20", 1000)) as flood:
        assert [flood.get("/v1/studies", headers=BAD).status_code for _ in range(5)] == [401] * 5
        limited = flood.get("/v1/studies", headers=BAD)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        # Before authentication: even a good key from that source waits.
        assert flood.get("/v1/studies", headers=good).status_code == 429
    with TestClient(app, client=("198.51.100.21", 1000)) as other:
        assert other.get("/v1/studies", headers=BAD).status_code == 401
        assert other.get("/v1/studies", headers=good).status_code == 200


def test_refused_keys_are_audited_one_row_per_source_and_interval(
    settings_env: dict[str, str], database_url: str
) -> None:
    flood_ip, lone_ip = f"203.0.113.{uuid.uuid4().int % 200 + 1}", "192.0.2.77"
    fields = _fields(settings_env, auth_failure_burst=10_000, refused_audit_interval_s=3600)
    app = create_app(ApiSettings(**fields))
    before = len(_denied_rows(database_url, flood_ip))
    with TestClient(app, client=(flood_ip, 1000)) as flood:
        started = time.perf_counter()
        for i in range(300):
            headers = BAD if i % 2 else {}
            assert flood.get("/v1/studies", headers=headers).status_code == 401
        elapsed = time.perf_counter() - started
        # Nothing chained per request while the interval is open.
        assert len(_denied_rows(database_url, flood_ip)) == before
        with TestClient(app, client=(lone_ip, 1000)) as lone:
            assert lone.get("/v1/events", headers=BAD).status_code == 401
        _flush(flood)
    print(f"\n300 refused requests from one source: {elapsed:.2f} s")
    rows = _denied_rows(database_url, flood_ip)[before:]
    assert len(rows) == 1, rows
    assert rows[0]["count"] == 300
    assert rows[0]["reasons"] == {
        "missing key or token": 150,
        "invalid, revoked or expired key": 150,
    }
    assert rows[0]["interval_s"] == 3600
    assert _denied_rows(database_url, lone_ip)[-1]["count"] == 1


def test_refused_access_is_audited_phi_free(
    settings_env: dict[str, str], database_url: str, make_key: Any
) -> None:
    tenant = f"tenant-probe-{uuid.uuid4().hex[:6]}"
    reader = {"Authorization": f"Bearer {make_key('uploader', tenant=tenant)}"}
    reviewer = {"Authorization": f"Bearer {make_key('reviewer', tenant=tenant)}"}
    probed = str(uuid.uuid4())
    study_uid = "1.2.826.0.1.3680043.8.498.99999999999999"
    with TestClient(create_app(ApiSettings(**_fields(settings_env)))) as api:
        assert api.get(f"/v1/studies/{probed}", headers=reader).status_code == 404
        assert api.get(f"/v1/studies/{probed}/report", headers=reader).status_code == 404
        r = api.post(f"/dicomweb/studies/{study_uid}", headers=reviewer, content=b"")
        assert r.status_code == 403
        assert api.get("/v1/review/queue", headers=reader).status_code == 403
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT a.resource_id, a.outcome, a.principal, a.detail, a.source_ip"
            " FROM audit_log a JOIN tenants t ON t.id = a.tenant_id"
            " WHERE t.name = %s AND a.action = 'access.refused' ORDER BY a.seq",
            (tenant,),
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [
        ("/v1/studies/{study_id}", "not_found"),
        ("/v1/studies/{study_id}/report", "not_found"),
        ("/dicomweb/studies/{study_instance_uid}", "denied"),
        ("/v1/review/queue", "denied"),
    ]
    assert rows[0][3] == {
        "method": "GET",
        "status": 404,
        "role": "uploader",
        "ids": {"study_id": probed},
    }
    assert rows[2][3]["role"] == "reviewer" and rows[2][3]["ids"] == {}
    assert rows[0][2] == "test-uploader"
    assert study_uid not in json.dumps([list(map(str, r)) for r in rows])
