"""Browser-facing security headers (issue 16, item 11): every response, the reviewer page
above all, carries a strict Content-Security-Policy with no inline script or style,
``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``, ``nosniff``, a Referrer-Policy, and
HSTS when the API serves TLS. The page itself still works in a real browser under that
policy: tests/orchestrator/test_review_page.py."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.settings import ApiSettings


def _client(**settings: str) -> TestClient:
    # No lifespan: these routes need no database, queue or store.
    return TestClient(create_app(ApiSettings(**settings)))


def _csp(header: str) -> dict[str, str]:
    return {
        part.split(" ", 1)[0]: part.split(" ", 1)[1] if " " in part else ""
        for part in (p.strip() for p in header.split(";"))
        if part
    }


def test_review_page_has_a_strict_policy() -> None:
    r = _client().get("/review")
    assert r.status_code == 200
    h = r.headers
    csp = _csp(h["content-security-policy"])
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'"
    assert csp["style-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert csp["base-uri"] == "'none'"
    assert csp["form-action"] == "'none'"
    assert "unsafe-inline" not in h["content-security-policy"]
    assert h["x-frame-options"] == "DENY"
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert "strict-transport-security" not in h
    # Nothing inline left for the policy to block: script and style are served routes.
    body = r.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", body)
    assert "<style" not in body
    assert not re.search(r"\son[a-z]+=", body)


@pytest.mark.parametrize(
    ("path", "media"),
    [("/review/app.js", "text/javascript"), ("/review/app.css", "text/css")],
)
def test_the_page_script_and_style_are_served(path: str, media: str) -> None:
    r = _client().get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(media)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert len(r.content) > 100


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/no-such-page"])
def test_every_response_carries_the_headers(path: str) -> None:
    h = _client().get(path).headers
    assert _csp(h["content-security-policy"])["frame-ancestors"] == "'none'"
    assert h["x-frame-options"] == "DENY"
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"


def test_hsts_when_tls_is_on() -> None:
    h = _client(tls_certfile="/x/cert.pem", tls_keyfile="/x/key.pem").get("/review").headers
    assert re.fullmatch(r"max-age=\d{8,}; includeSubDomains", h["strict-transport-security"])
