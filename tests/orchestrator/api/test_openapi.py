"""API inventory: the routes the app serves are exactly the operations its OpenAPI document
describes, plus a declared list of undocumented ones; the description can be turned off."""

from __future__ import annotations

from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.api.app import PUBLIC_PATHS, iter_routes
from orchestrator.settings import ApiSettings

# Served on purpose without an OpenAPI entry: the description itself, Prometheus' scrape and
# discovery endpoints, and the reviewer page's HTML shell.
UNDOCUMENTED = {
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/metrics/targets"),
    ("GET", "/review"),
    # Its script and style, served (not inline) under a strict Content-Security-Policy.
    ("GET", "/review/app.js"),
    ("GET", "/review/app.css"),
}
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def _served(settings: ApiSettings) -> set[tuple[str, str]]:
    app = create_app(settings)
    return {(method, path) for path, methods in iter_routes(app.routes) for method in methods}


def test_served_routes_are_the_documented_ones() -> None:
    app = create_app(ApiSettings())
    served = _served(ApiSettings())
    spec = app.openapi()
    documented = {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    }
    assert documented - served == set(), "documented but not served"
    assert served - documented == UNDOCUMENTED, "served without documentation: declare or document"
    # Every undocumented route is one of the public ones (nothing hidden needs a key).
    assert {path for _, path in UNDOCUMENTED} <= PUBLIC_PATHS
    # Operation ids are unique, so generated clients get one function per operation.
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) == len(documented)
    assert len(documented) >= 40


def test_docs_can_be_turned_off() -> None:
    on = TestClient(create_app(ApiSettings()))
    assert on.get("/openapi.json").status_code == 200
    assert on.get("/docs").status_code == 200
    settings = ApiSettings(docs_enabled=False)
    assert {path for _, path in _served(settings)} & DOCS == set()
    off = TestClient(create_app(settings))
    for path in sorted(DOCS):
        assert off.get(path).status_code == 404, path
    # Everything else is still served.
    assert _served(settings) == _served(ApiSettings()) - {("GET", p) for p in DOCS}
