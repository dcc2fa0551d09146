"""Audit fields a client cannot forge (issue 16, item 7): ``X-Forwarded-For`` counts only
when the connection comes from a configured trusted proxy (MEDTRIAGE_TRUSTED_PROXIES), and
a client's ``X-Request-ID`` is kept only when it is a short token (else a fresh id is made
and returned). Checked on the audit row of a refused access (a signed-in caller's 404, one
row per request), over the real PostgreSQL."""

from __future__ import annotations

import re
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.settings import ApiSettings

pytestmark = pytest.mark.integration

GENERATED = re.compile(r"[0-9a-f]{32}")


def _row(database_url: str, request_id: str) -> tuple[str, str]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT source_ip, request_id FROM audit_log WHERE request_id = %s", (request_id,)
        ).fetchone()
    assert row is not None, request_id
    return str(row[0]), str(row[1])


def _probe() -> str:
    return f"/v1/studies/{uuid4()}"


def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    stack: Any, database_url: str, make_key: Any
) -> None:
    """The real API process (uvicorn) with no trusted proxy: a client on loopback cannot
    name another source, and markup as a request id is replaced."""
    key = make_key("uploader", tenant="tenant-origin")
    r = httpx.get(
        f"{stack.api_url}{_probe()}",
        headers={
            "Authorization": f"Bearer {key}",
            "X-Forwarded-For": "203.0.113.66",
            "X-Request-ID": "<script>alert(1)</script>",
        },
    )
    assert r.status_code == 404
    request_id = r.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id), request_id
    assert _row(database_url, request_id) == ("127.0.0.1", request_id)


@pytest.mark.parametrize(
    ("peer", "forwarded", "source"),
    [
        # From the trusted proxy: the nearest address that is not itself a trusted proxy.
        ("10.1.2.3", "198.51.100.7", "198.51.100.7"),
        ("10.1.2.3", "198.51.100.7, 10.0.0.9", "198.51.100.7"),
        ("10.1.2.3", "192.0.2.1, 198.51.100.7", "198.51.100.7"),
        # Garbage in the header: the proxy's own address, never the text.
        ("10.1.2.3", "<b>not-an-ip</b>", "10.1.2.3"),
        # Not from a trusted proxy: the header is ignored.
        ("192.0.2.44", "198.51.100.7", "192.0.2.44"),
    ],
    ids=["one-hop", "two-proxies", "client-spoof-left", "garbage", "untrusted-peer"],
)
def test_trusted_proxies(
    settings_env: dict[str, str],
    database_url: str,
    make_key: Any,
    peer: str,
    forwarded: str,
    source: str,
) -> None:
    key = make_key("uploader", tenant="tenant-origin")
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    fields["trusted_proxies"] = "10.0.0.0/8"
    given = f"req-{uuid4().hex[:12]}"
    with TestClient(create_app(ApiSettings(**fields)), client=(peer, 40000)) as api:
        r = api.get(
            _probe(),
            headers={
                "Authorization": f"Bearer {key}",
                "X-Forwarded-For": forwarded,
                "X-Request-ID": given,
            },
        )
    assert r.status_code == 404
    request_id = r.headers["x-request-id"]
    assert request_id == given  # a short token is kept
    assert _row(database_url, request_id) == (source, request_id)


@pytest.mark.parametrize(
    "given", ["", "a" * 200, "x y", "id;drop", "<i>", "ok\r\nSet-Cookie: x=1"], ids=repr
)
def test_invalid_request_ids_are_replaced(settings_env: dict[str, str], given: str) -> None:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    with TestClient(create_app(ApiSettings(**fields))) as api:
        r = api.get("/healthz", headers={"X-Request-ID": given})
    assert GENERATED.fullmatch(r.headers["x-request-id"])
