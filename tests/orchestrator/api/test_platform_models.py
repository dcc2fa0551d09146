"""Platform-wide model operations against the real stack (issue 16, item 3).

Model routes, shadows, thresholds and the versions loaded in Triton are shared by every
tenant, so only a platform key may change them: a tenant's ml-engineer or admin gets 403 and
nothing changes. Unloading a version that a route or shadow points to is refused (409, the
routes named), and /readyz reports a routed version that Triton has not loaded.
"""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from orchestrator.inference.model_control import TritonControl

pytestmark = pytest.mark.integration

# (method, path, body) of every platform-wide change, against a model that does not exist so
# that an allowed call changes nothing.
CHANGES = [
    ("PUT", "/v1/models/no-such-model/routes", {"weights": {"1": 100}}),
    ("POST", "/v1/models/no-such-model/shadows/1", None),
    ("DELETE", "/v1/models/no-such-model/shadows/1", None),
    ("POST", "/v1/models/no-such-model/versions/1/promote", None),
    ("POST", "/v1/models/no-such-model/rollback", None),
    ("PUT", "/v1/models/no-such-model/thresholds", {"min_confidence": 0.5}),
    ("POST", "/v1/models/no-such-model/versions/1/load", None),
    ("POST", "/v1/models/no-such-model/versions/1/unload", None),
]
TENANT_ROLES = ["ml-engineer", "admin"]
PLATFORM_ROLES = ["platform-ml-engineer", "platform-admin"]


def _client(stack: Any, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {key}"}
    )


def _call(client: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    return client.request(method, path, json=body) if body else client.request(method, path)


@pytest.mark.parametrize("role", TENANT_ROLES)
def test_a_tenant_key_cannot_change_platform_wide_models(
    stack: Any, make_key: Any, database_url: str, role: str
) -> None:
    with _client(stack, make_key(role, "tenant-p")) as client:
        for method, path, body in CHANGES:
            r = _call(client, method, path, body)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            detail = r.json()["detail"]
            assert "every tenant" in detail and "platform" in detail, detail
        # Reading stays open to the tenant's ml-engineer / admin.
        assert client.get("/v1/models").status_code == 200
        # The real model is untouched by a refused change.
        r = client.put("/v1/models/triage/thresholds", json={"min_confidence": 0.01})
        assert r.status_code == 403
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM gate_thresholds WHERE model = 'triage' AND min_confidence = 0.01"
        ).fetchone()
    assert rows is not None and rows[0] == 0


@pytest.mark.parametrize("role", PLATFORM_ROLES)
def test_a_platform_key_may_change_platform_wide_models(
    stack: Any, make_key: Any, database_url: str, role: str
) -> None:
    with _client(stack, make_key(role, "platform")) as client:
        for method, path, body in CHANGES:
            r = _call(client, method, path, body)
            assert r.status_code not in (401, 403), (method, path, r.status_code, r.text)
        assert client.get("/v1/models").status_code == 200
        # And the change takes: a threshold on the real model (removed again afterwards).
        r = client.put("/v1/models/triage/thresholds", json={"version": 1, "min_confidence": 0.3})
        assert r.status_code == 200, r.text
        assert any(t["min_confidence"] == 0.3 for t in r.json()["thresholds"])
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM gate_thresholds WHERE model = 'triage' AND version = 1")


def test_a_platform_key_cannot_read_patient_data(stack: Any, make_key: Any) -> None:
    with _client(stack, make_key("platform-ml-engineer", "platform")) as client:
        assert client.get("/v1/studies").status_code == 403
        assert client.get("/v1/review/queue").status_code == 403


def test_unloading_a_routed_version_is_refused_naming_the_routes(stack: Any, make_key: Any) -> None:
    with _client(stack, make_key("platform-ml-engineer", "platform")) as ml:
        assert ml.put("/v1/models/triage/routes", json={"weights": {"2": 100}}).status_code == 200
        refused = ml.post("/v1/models/triage/versions/2/unload")
        assert refused.status_code == 409, refused.text
        assert "live route triage v2 (100 %)" in refused.json()["detail"]
        # A shadow counts too.
        assert ml.post("/v1/models/triage/shadows/1").status_code == 200
        try:
            refused = ml.post("/v1/models/triage/versions/1/unload")
            assert refused.status_code == 409, refused.text
            assert "shadow route triage v1" in refused.json()["detail"]
        finally:
            assert ml.delete("/v1/models/triage/shadows/1").status_code == 200
        models = {m["model"]: m for m in ml.get("/v1/models").json()["models"]}
        assert {1, 2} <= set(models["triage"]["loaded"])


def test_readyz_reports_a_routed_version_that_is_not_loaded(
    stack: Any, make_key: Any, settings_env: dict[str, str]
) -> None:
    with _client(stack, make_key("platform-ml-engineer", "platform")) as ml:
        assert ml.put("/v1/models/triage/routes", json={"weights": {"2": 100}}).status_code == 200
        assert ml.post("/v1/models/triage/shadows/1").status_code == 200
        ready = httpx.get(f"{stack.api_url}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        # Triton loses v1 behind the API's back (a restart with another policy, an operator).
        control = TritonControl(settings_env["MEDTRIAGE_TRITON_GRPC_URL"])
        try:
            control.unload("triage", 1)
            ready = httpx.get(f"{stack.api_url}/readyz", timeout=30)
            assert ready.status_code == 503, ready.text
            body = ready.json()
            assert "models" in body["down"]
            assert "triage v1" in body["checks"]["models"]
        finally:
            control.load("triage", 1)
            control.close()
            ml.delete("/v1/models/triage/shadows/1")
        assert httpx.get(f"{stack.api_url}/readyz", timeout=30).status_code == 200
