"""Role x route matrix over the real stack: every role against every route of the app.

The allowed roles per route are declared here, in one table; a route missing from the table
fails the test (new routes must be classified). A role outside a route's set must get 403;
a role inside it must get past authorisation (anything but 401/403). Actions run against a
model that does not exist, so nothing is changed by the allowed calls.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.api.app import PUBLIC_PATHS, iter_routes
from orchestrator.settings import ApiSettings
from orchestrator.store.db.keys import ROLES

pytestmark = pytest.mark.integration

READ_PATIENT_DATA = {"uploader", "reviewer", "ml-engineer", "admin"}
MODEL_READ = {"ml-engineer", "sre", "admin", "platform-ml-engineer", "platform-admin"}
# Platform-wide (every tenant gets these models): platform keys only, never a tenant's admin.
MODEL_ACTION = {"platform-ml-engineer", "platform-admin"}
OPERATIONS = {"sre", "admin"}
REVIEW = {"reviewer", "admin"}
WEBHOOKS = {"uploader", "admin"}

ALLOWED: dict[tuple[str, str], set[str]] = {
    ("POST", "/v1/studies"): {"uploader", "admin"},
    ("POST", "/dicomweb/studies"): {"uploader", "admin"},
    ("POST", "/dicomweb/studies/{study_instance_uid}"): {"uploader", "admin"},
    ("GET", "/v1/studies"): READ_PATIENT_DATA,
    ("GET", "/v1/studies/{study_id}"): READ_PATIENT_DATA,
    ("GET", "/v1/studies/{study_id}/instances/{instance_id}/preview"): READ_PATIENT_DATA,
    ("GET", "/v1/studies/{study_id}/report"): READ_PATIENT_DATA,
    ("GET", "/v1/studies/{study_id}/events"): READ_PATIENT_DATA,
    ("GET", "/v1/events"): READ_PATIENT_DATA,
    ("GET", "/v1/models"): MODEL_READ,
    ("GET", "/v1/models/{model}/compare"): MODEL_READ,
    ("PUT", "/v1/models/{model}/routes"): MODEL_ACTION,
    ("POST", "/v1/models/{model}/shadows/{version}"): MODEL_ACTION,
    ("DELETE", "/v1/models/{model}/shadows/{version}"): MODEL_ACTION,
    ("POST", "/v1/models/{model}/versions/{version}/promote"): MODEL_ACTION,
    ("POST", "/v1/models/{model}/rollback"): MODEL_ACTION,
    ("GET", "/v1/models/{model}/thresholds"): MODEL_READ,
    ("PUT", "/v1/models/{model}/thresholds"): MODEL_ACTION,
    ("POST", "/v1/models/{model}/versions/{version}/load"): MODEL_ACTION,
    ("POST", "/v1/models/{model}/versions/{version}/unload"): MODEL_ACTION,
    ("GET", "/v1/audit"): {"admin"},
    ("POST", "/v1/studies/{study_id}/legal-hold"): {"admin"},
    ("POST", "/v1/studies/{study_id}/legal-hold/release"): {"admin"},
    ("GET", "/v1/legal-holds"): {"admin"},
    ("POST", "/v1/break-glass"): {"reviewer", "ml-engineer", "sre", "admin"},
    ("GET", "/v1/dead-letters"): OPERATIONS,
    ("POST", "/v1/dead-letters/requeue"): OPERATIONS,
    ("GET", "/v1/review/queue"): REVIEW,
    ("GET", "/v1/review/queue/view"): REVIEW,
    ("GET", "/v1/review/cases/{case_id}"): REVIEW,
    ("GET", "/v1/review/cases/{case_id}/view"): REVIEW,
    ("POST", "/v1/review/cases/{case_id}/claim"): REVIEW,
    ("POST", "/v1/review/cases/{case_id}/release"): REVIEW,
    ("POST", "/v1/review/cases/{case_id}/verdict"): REVIEW,
    ("GET", "/v1/review/stats"): REVIEW,
    ("POST", "/v1/webhooks"): WEBHOOKS,
    ("GET", "/v1/webhooks"): WEBHOOKS,
    ("DELETE", "/v1/webhooks/{webhook_id}"): WEBHOOKS,
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): WEBHOOKS,
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): WEBHOOKS,
    ("POST", "/v1/pacs-targets"): {"admin"},
    ("GET", "/v1/pacs-targets"): {"admin"},
    ("POST", "/v1/studies/{study_id}/report/export"): REVIEW,
}
# Read-only for sre: whatever sre may call must not change anything...
SRE_MAY_CHANGE = {("POST", "/v1/break-glass"), ("POST", "/v1/dead-letters/requeue")}
STREAM_TIMEOUT_S = 5.0
NO_SUCH = "00000000-0000-0000-0000-00000000dead"


def _routes() -> list[tuple[str, str]]:
    app = create_app(ApiSettings())
    return sorted(
        (method, path)
        for path, methods in iter_routes(app.routes)
        if path not in PUBLIC_PATHS
        for method in methods
    )


def _url(path: str) -> str:
    values = {"model": "no-such-model", "version": "1"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), NO_SUCH), path)


def _status(client: httpx.Client, method: str, path: str) -> int:
    # Harmless bodies: no real model, a too-short break-glass reason, no study ids.
    body = {"weights": {"1": 100}, "role": "reviewer", "reason": "x", "study_ids": []}
    kwargs: dict[str, Any] = {"json": body} if method in ("POST", "PUT") else {}
    with client.stream(method, _url(path), timeout=STREAM_TIMEOUT_S, **kwargs) as r:
        return r.status_code


def test_every_route_is_declared() -> None:
    served = set(_routes())
    assert served - set(ALLOWED) == set(), "declare the allowed roles of these new routes"
    assert set(ALLOWED) - served == set(), "these declared routes no longer exist"


def test_sre_is_read_only() -> None:
    for (method, path), roles in ALLOWED.items():
        if "sre" in roles and method != "GET":
            assert (method, path) in SRE_MAY_CHANGE, (method, path)


def test_role_route_matrix(stack: Any, make_key: Any) -> None:
    keys = {role: make_key(role, tenant="tenant-roles") for role in ROLES}
    violations: list[tuple[str, str, str, int]] = []
    cells = 0
    for role, key in keys.items():
        with httpx.Client(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}
        ) as client:
            for method, path in _routes():
                allowed = ALLOWED.get((method, path), set())
                status = _status(client, method, path)
                cells += 1
                if role in allowed and status in (401, 403):
                    violations.append((role, method, path, status))
                if role not in allowed and status != 403:
                    violations.append((role, method, path, status))
    print(f"\nrole x route: {cells} cells, {len(violations)} violations")
    assert cells == len(ROLES) * len(ALLOWED)
    assert violations == []
