"""People's bearer tokens, break-glass, key expiry/revocation and rate limits, in-process
over the real PostgreSQL and Redis (a tiny built-in issuer writes the JWKS file)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from orchestrator import metrics
from orchestrator.api import create_app
from orchestrator.api.deps import refused_keys
from orchestrator.security.oidc import Issuer
from orchestrator.settings import ApiSettings
from orchestrator.store.db.keys import create_key, ensure_tenant

pytestmark = pytest.mark.integration

TENANT = "tenant-jwt"
IDLE_S = 2
MAX_S = 60


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def api(
    settings_env: dict[str, str], issuer: Issuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    jwks = issuer.write_jwks(tmp_path_factory.mktemp("oidc") / "jwks.json")
    fields: dict[str, Any] = {
        k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()
    }
    fields.update(
        oidc_issuer=issuer.issuer,
        oidc_audience=issuer.audience,
        oidc_jwks_file=str(jwks),
        session_idle_timeout_s=IDLE_S,
        session_max_s=MAX_S,
        queue_prefix=f"jwt-{uuid.uuid4().hex[:6]}",
    )
    with psycopg.connect(settings_env["MEDTRIAGE_DATABASE_URL"]) as conn:
        ensure_tenant(conn, TENANT)
    with TestClient(create_app(ApiSettings(**fields))) as client:
        yield client


def _get(api: TestClient, token: str, path: str = "/v1/studies") -> int:
    return api.get(path, headers={"Authorization": f"Bearer {token}"}).status_code


def test_valid_token_gives_role_and_tenant(api: TestClient, issuer: Issuer) -> None:
    token = issuer.mint("alice", role="reviewer", tenant=TENANT)
    assert _get(api, token) == 200
    assert _get(api, token, "/v1/audit") == 403  # reviewer is not admin
    admin = issuer.mint("root", role="admin", tenant=TENANT)
    page = api.get(
        "/v1/audit",
        params={"principal": "person:alice"},
        headers={"Authorization": f"Bearer {admin}"},
    ).json()
    assert page["total"] >= 1 and page["items"][0]["principal"] == "person:alice"


def _forged_tokens(issuer: Issuer) -> dict[str, str]:
    good = issuer.mint("mallory", role="admin", tenant=TENANT)
    header, payload, _sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    pem = issuer.key.as_pem(private=False)
    hs_header = _b64(json.dumps({"alg": "HS256", "kid": issuer.key.kid, "typ": "JWT"}).encode())
    hs_body = f"{hs_header}.{payload}"
    hs_sig = _b64(hmac.new(pem, hs_body.encode(), hashlib.sha256).digest())
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    other = Issuer(issuer.issuer, issuer.audience)
    tampered = dict(claims, medtriage_tenant="someone-else")
    return {
        "alg=none": f"{none_header}.{payload}.",
        "HS256 signed with the public key": f"{hs_body}.{hs_sig}",
        "signed by another key": other.mint("mallory", role="admin", tenant=TENANT),
        "claims edited": f"{header}.{_b64(json.dumps(tampered).encode())}.{_sig}",
        "expired": issuer.mint("bob", role="admin", tenant=TENANT, lifetime_s=-120),
        "wrong audience": Issuer(issuer.issuer, "other-app").mint(
            "bob", role="admin", tenant=TENANT
        ),
        "wrong issuer": Issuer("https://evil.test", issuer.audience).mint(
            "bob", role="admin", tenant=TENANT
        ),
        "unknown tenant": issuer.mint("bob", role="admin", tenant="no-such-tenant"),
        "unknown role": issuer.mint("bob", role="superuser", tenant=TENANT),
        "garbage": "a.b.c",
    }


def test_forged_and_invalid_tokens_are_refused_and_audited(
    api: TestClient, issuer: Issuer, database_url: str
) -> None:
    forged = _forged_tokens(issuer)
    # Audited in aggregate per source and interval (test_refusals.py): flush the interval.
    services = api.app.state.services  # type: ignore[attr-defined]
    refused_keys(services).flush(services.pool, force=True)
    with psycopg.connect(database_url) as conn:
        before = conn.execute(
            "SELECT coalesce(sum((detail->>'count')::int), 0) FROM audit_log"
            " WHERE action = 'authenticate' AND outcome = 'denied'"
        ).fetchone()[0]
    for name, token in forged.items():
        # The correctly signed original is accepted, so the refusals are about the forgery.
        assert _get(api, token) == 401, name
    refused_keys(services).flush(services.pool, force=True)
    with psycopg.connect(database_url) as conn:
        after = conn.execute(
            "SELECT coalesce(sum((detail->>'count')::int), 0) FROM audit_log"
            " WHERE action = 'authenticate' AND outcome = 'denied'"
        ).fetchone()[0]
    assert after - before == len(forged)


def test_idle_and_absolute_session_lifetimes(api: TestClient, issuer: Issuer) -> None:
    token = issuer.mint("carol", role="reviewer", tenant=TENANT, lifetime_s=600)
    assert _get(api, token) == 200
    time.sleep(IDLE_S + 1.5)
    assert _get(api, token) == 401  # idle: the token itself is still within exp
    old = issuer.mint(
        "dave", role="reviewer", tenant=TENANT, issued_at=time.time() - MAX_S - 5, lifetime_s=600
    )
    assert _get(api, old) == 401  # absolute lifetime since login


def test_break_glass_needs_reason_expires_is_audited_and_alerts(
    api: TestClient, issuer: Issuer, database_url: str
) -> None:
    token = issuer.mint("erin", role="sre", tenant=TENANT, lifetime_s=600)
    auth = {"Authorization": f"Bearer {token}"}
    assert _get(api, token) == 403  # sre does not read patient data
    counter = metrics.BREAK_GLASS_GRANTS.labels("reviewer")
    before = counter._value.get()
    short = api.post("/v1/break-glass", json={"role": "reviewer", "reason": "now"}, headers=auth)
    assert short.status_code == 400
    admin = api.post("/v1/break-glass", json={"role": "admin", "reason": "x" * 20}, headers=auth)
    assert admin.status_code == 400
    too_long = api.post(
        "/v1/break-glass",
        json={"role": "reviewer", "reason": "ER case, PACS down", "duration_s": 10**6},
        headers=auth,
    )
    assert too_long.status_code == 400
    granted = api.post(
        "/v1/break-glass",
        json={"role": "reviewer", "reason": "ER case, PACS down", "duration_s": 1},
        headers=auth,
    )
    assert granted.status_code == 201, granted.text
    assert counter._value.get() == before + 1
    assert _get(api, token) == 200
    time.sleep(1.3)  # past the grant, within the session's idle limit
    assert _get(api, token) == 403  # expired
    with psycopg.connect(database_url) as conn:
        actions = [
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_log WHERE principal = 'person:erin' ORDER BY seq"
            )
        ]
    assert "break_glass.grant" in actions and "break_glass.use" in actions
    assert (
        api.get("/metrics").text.count('medtriage_break_glass_grants_total{role="reviewer"}') == 1
    )


def test_expired_and_revoked_keys_are_refused(api: TestClient, database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        _, short = create_key(
            conn, tenant=TENANT, name="short", role="reviewer", expires_in=timedelta(seconds=1)
        )
        key_id, revoked = create_key(conn, tenant=TENANT, name="rev", role="reviewer")
    assert _get(api, short) == 200
    time.sleep(1.5)
    assert _get(api, short) == 401
    assert _get(api, revoked) == 200
    env = {**os.environ, "MEDTRIAGE_DATABASE_URL": database_url}
    cli = [sys.executable, "-m", "orchestrator.cli", "keys"]
    done = subprocess.run([*cli, "revoke", str(key_id)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _get(api, revoked) == 401
    listing = subprocess.run(
        [*cli, "list", "--tenant", TENANT], env=env, capture_output=True, text=True
    )
    assert str(key_id) in listing.stdout and "revoked" in listing.stdout
    # The secret is everything after "mt_<prefix>_" (token_urlsafe may itself contain "_").
    secret = revoked.split("_", 2)[2]
    assert secret and revoked not in listing.stdout and secret not in listing.stdout
    created = subprocess.run(
        [*cli, "create", "--role", "uploader", "--tenant", TENANT, "--expires-in", "1h", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert created.returncode == 0 and created.stdout.startswith("mt_")
    assert "shown once" in created.stderr


def test_rate_limit_per_key_answers_429_with_retry_after(
    settings_env: dict[str, str], make_key: Any
) -> None:
    fields: dict[str, Any] = {
        k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()
    }
    fields.update(
        rate_limit_per_s=0.5, rate_limit_burst=3, queue_prefix=f"rl-{uuid.uuid4().hex[:6]}"
    )
    key, other = make_key("reviewer"), make_key("reviewer")
    with TestClient(create_app(ApiSettings(**fields))) as client:
        codes = [_get(client, key) for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = client.get("/v1/studies", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 3
        assert _get(client, other) == 200  # per key, not global
        time.sleep(2.1)
        assert _get(client, key) == 200  # refilled
