"""Tenant isolation over the real stack: tenant A's ids replayed as tenant B on every route
of the app (walked from the route table) never succeed, and answer 404, not 403."""

from __future__ import annotations

import io
import re
import time
from typing import Any

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from orchestrator.api import create_app
from orchestrator.api.app import PUBLIC_PATHS, iter_routes
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import ApiSettings

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
# Path parameters that name a tenant's data; replaying them across tenants must give 404.
TENANT_OWNED = {
    "study_id",
    "instance_id",
    "case_id",
    "webhook_id",
    "delivery_id",
    "report_id",
}
# Path parameters naming platform-wide resources (models are shared by every tenant).
GLOBAL = {"model", "version"}
# Upload routes store into the caller's tenant (a StudyInstanceUID is scoped per tenant).
UPLOADS = {"/v1/studies", "/dicomweb/studies", "/dicomweb/studies/{study_instance_uid}"}
# Streaming routes are read only until the status line arrives.
STREAM_TIMEOUT_S = 5.0


def routes() -> list[tuple[str, str]]:
    app = create_app(ApiSettings())
    return sorted(
        (method, path)
        for path, methods in iter_routes(app.routes)
        if path not in PUBLIC_PATHS
        for method in methods
    )


def _chest_film() -> bytes:
    """A paediatric chest CR film the chest models take (a CT slice is not_applicable)."""
    images, _ = load_samples()
    return radiograph(images[0], study_uid=generate_uid(), size=256)


def _ct(study_uid: str) -> bytes:
    ds = dcmread(io.BytesIO(_chest_film()))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tenant_a(stack: Any, make_key: Any) -> dict[str, str]:
    key = make_key("uploader", tenant="tenant-iso-a")
    with httpx.Client(base_url=stack.api_url, timeout=60) as c:
        r = c.post(
            "/v1/studies",
            files=[("files", ("a.dcm", _ct(generate_uid()), "application/dicom"))],
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 202, r.text
        study_id = r.json()["id"]
        deadline = time.monotonic() + WAIT_S
        while True:
            body = c.get(
                f"/v1/studies/{study_id}", headers={"Authorization": f"Bearer {key}"}
            ).json()
            if body["status"] in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert body["status"] in TERMINAL, body["status"]
    instance = body["instances"][0]
    assert instance["preview"], "tenant A's instance has a preview to steal"
    return {"key": key, "study_id": study_id, "instance_id": instance["id"]}


def _concrete(path: str, ids: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in TENANT_OWNED:
            assert name in ids, f"the replay test has no tenant-A value for {{{name}}}; add one"
            return ids[name]
        assert name in GLOBAL, f"classify path parameter {{{name}}} as TENANT_OWNED or GLOBAL"
        return "triage" if name == "model" else "1"

    return re.sub(r"\{(\w+)\}", sub, path)


def _call(client: httpx.Client, method: str, url: str, ids: dict[str, str]) -> tuple[int, str]:
    # Bodies that name tenant A's data wherever a route takes ids in its body (and a valid
    # verdict and hold reason, so those routes answer for the case or study, not the body).
    body = {
        "study_ids": [ids["study_id"]],
        "all": False,
        "verdict": "agree",
        "reason": "cross-tenant probe",
    }
    kwargs: dict[str, Any] = {"json": body} if method in ("POST", "PUT") else {}
    with client.stream(method, url, timeout=STREAM_TIMEOUT_S, **kwargs) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, ""
        return r.status_code, r.read().decode(errors="replace")


def _review_case(database_url: str, study_id: str) -> str:
    """Tenant A's review case: the gate's if it opened one, else one opened here."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO review_cases (tenant_id, study_id, reasons)"
            " SELECT tenant_id, id, '{low_confidence}' FROM studies WHERE id = %s"
            " ON CONFLICT (study_id) DO NOTHING",
            (study_id,),
        )
        row = conn.execute(
            "SELECT id FROM review_cases WHERE study_id = %s", (study_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def _webhook(database_url: str, study_id: str) -> dict[str, str]:
    """A webhook of tenant A with one (dead, so never sent) delivery."""
    with psycopg.connect(database_url) as conn:
        webhook_id, tenant_id = conn.execute(
            "INSERT INTO webhooks (tenant_id, url, secret)"
            " SELECT tenant_id, 'http://127.0.0.1:9/', 'test-secret' FROM studies"
            " WHERE id = %s RETURNING id, tenant_id",
            (study_id,),
        ).fetchone()
        delivery_id = conn.execute(
            "INSERT INTO webhook_deliveries (webhook_id, tenant_id, event, payload, status)"
            " VALUES (%s, %s, 'report.created', '{}', 'dead') RETURNING id",
            (webhook_id, tenant_id),
        ).fetchone()[0]
    return {"webhook_id": str(webhook_id), "delivery_id": str(delivery_id)}


def test_replaying_tenant_a_ids_as_tenant_b_never_succeeds(
    stack: Any, make_key: Any, tenant_a: dict[str, str], database_url: str
) -> None:
    table = routes()
    assert len(table) >= 15
    ids = {
        "study_id": tenant_a["study_id"],
        "instance_id": tenant_a["instance_id"],
        "case_id": _review_case(database_url, tenant_a["study_id"]),
        **_webhook(database_url, tenant_a["study_id"]),
    }
    # Tenant B's most powerful key; break-glass roles do not cross tenants either.
    b_admin = make_key("admin", tenant="tenant-iso-b")
    a_admin = make_key("admin", tenant="tenant-iso-a")
    succeeded: list[tuple[str, str, int]] = []
    checked = 0
    with (
        httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {b_admin}"}) as b,
        httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {a_admin}"}) as a,
    ):
        for method, path in table:
            params = set(re.findall(r"\{(\w+)\}", path))
            if params & GLOBAL and not params & TENANT_OWNED:
                continue  # platform-wide resources: no tenant data to replay
            if method == "POST" and path in UPLOADS:
                continue  # creates in the caller's own tenant; nothing of A's is named
            url = _concrete(path, ids)
            status, text = _call(b, method, url, ids)
            checked += 1
            if params & TENANT_OWNED:
                if status != 404:
                    succeeded.append((method, path, status))
                if method == "GET":
                    # The same request as tenant A does find the data: the ids are real.
                    assert _call(a, method, url, ids)[0] == 200, (method, path)
            elif 200 <= status < 300 and (ids["study_id"] in text or ids["instance_id"] in text):
                succeeded.append((method, path, status))
    print(f"\ncross-tenant replay: {checked} requests, {len(succeeded)} succeeded")
    assert checked >= 8
    assert succeeded == [], f"tenant B reached tenant A's data: {succeeded}"


def test_tenant_b_does_not_see_tenant_a_in_lists_or_audit(
    stack: Any, make_key: Any, tenant_a: dict[str, str]
) -> None:
    b_admin = make_key("admin", tenant="tenant-iso-b")
    a_admin = make_key("admin", tenant="tenant-iso-a")
    with httpx.Client(base_url=stack.api_url, timeout=30) as c:
        listing = c.get("/v1/studies", headers={"Authorization": f"Bearer {b_admin}"}).json()
        assert all(s["id"] != tenant_a["study_id"] for s in listing["items"])
        audit_b = c.get(
            "/v1/audit", params={"limit": 1000}, headers={"Authorization": f"Bearer {b_admin}"}
        )
        assert audit_b.status_code == 200
        # B's own refused probes of A's ids (the replay test above) are in B's trail — the id
        # B itself sent, refused; nothing of A's that B did not already hold is.
        naming_a = [row for row in audit_b.json()["items"] if tenant_a["study_id"] in str(row)]
        assert all(row["outcome"] != "ok" for row in naming_a), naming_a
        audit_a = c.get(
            "/v1/audit",
            params={"resource_id": tenant_a["study_id"]},
            headers={"Authorization": f"Bearer {a_admin}"},
        )
        assert audit_a.json()["total"] >= 1
