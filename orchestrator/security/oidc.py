"""People's bearer tokens: OIDC JWTs checked against a configured issuer's JWKS.

Checked: the signature (asymmetric algorithms only, so ``alg=none`` and HS/RS confusion —
an HMAC token "signed" with the public key — are refused), ``iss``, ``aud``, ``exp``,
``iat``, and the session (``sid``) against idle and absolute lifetimes. Role and tenant
come from claims. ``Issuer`` is a tiny built-in issuer for tests and local use.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

# Only asymmetric signatures: a shared-secret algorithm would let anyone holding the public
# JWKS mint tokens (HS/RS confusion), and "none" is no signature at all.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
# Clock skew tolerated on exp/iat/nbf.
LEEWAY_S = 30
RSA_BITS = 2048


class TokenInvalid(Exception):
    """The token is not acceptable; the message says why (never echoes claims)."""


@dataclass(frozen=True)
class TokenIdentity:
    subject: str
    issuer: str
    role: str
    tenant: str
    session_id: str
    issued_at: int

    @property
    def principal_id(self) -> uuid.UUID:
        # A stable id per person, for the audit's principal_id column.
        return uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer}#{self.subject}")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("mt_")


def load_jwks(path: str | Path) -> KeySet:
    data = json.loads(Path(path).read_text())
    keys = [k for k in data.get("keys", []) if k.get("kty") in ("RSA", "EC")]
    if not keys:
        raise ValueError(f"{path}: no RSA or EC public keys in the JWKS")
    for k in keys:
        if "d" in k:
            raise ValueError(f"{path}: the JWKS holds a private key; publish public keys only")
    return KeySet.import_key_set({"keys": keys})


class Verifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: KeySet,
        role_claim: str = "medtriage_role",
        tenant_claim: str = "medtriage_tenant",
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwks
        self.role_claim = role_claim
        self.tenant_claim = tenant_claim

    def verify(self, token: str, *, now: float | None = None) -> TokenIdentity:
        try:
            decoded = jwt.decode(token, self.jwks, algorithms=list(ALLOWED_ALGORITHMS))
        except JoseError as exc:
            raise TokenInvalid(f"bad token: {type(exc).__name__}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenInvalid("malformed token") from exc
        if decoded.header.get("alg") not in ALLOWED_ALGORITHMS:
            raise TokenInvalid("token algorithm not allowed")
        registry = jwt.JWTClaimsRegistry(
            now=int(now if now is not None else time.time()),
            leeway=LEEWAY_S,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
            iat={"essential": True},
            sub={"essential": True},
            sid={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise TokenInvalid(f"token rejected: {type(exc).__name__}") from exc
        claims = decoded.claims
        role, tenant = claims.get(self.role_claim), claims.get(self.tenant_claim)
        if not isinstance(role, str) or not isinstance(tenant, str):
            raise TokenInvalid(
                f"token lacks the {self.role_claim!r} or {self.tenant_claim!r} claim"
            )
        return TokenIdentity(
            subject=str(claims["sub"]),
            issuer=self.issuer,
            role=role,
            tenant=tenant,
            session_id=str(claims["sid"]),
            issued_at=int(claims["iat"]),
        )


class Issuer:
    """A minimal issuer: one RSA key, a public JWKS file, and ``mint`` for tokens."""

    def __init__(self, issuer: str = "https://issuer.test", audience: str = "medtriage") -> None:
        self.issuer = issuer
        self.audience = audience
        self.key = RSAKey.generate_key(RSA_BITS, parameters={"kid": uuid.uuid4().hex[:12]})

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False, use="sig", alg="RS256")]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.public_jwks()))
        return path

    def mint(
        self,
        subject: str,
        *,
        role: str,
        tenant: str,
        session_id: str | None = None,
        lifetime_s: int = 300,
        issued_at: float | None = None,
        **extra: Any,
    ) -> str:
        iat = int(issued_at if issued_at is not None else time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": iat,
            "exp": iat + lifetime_s,
            "sid": session_id or uuid.uuid4().hex,
            "medtriage_role": role,
            "medtriage_tenant": tenant,
            **extra,
        }
        header = {"alg": "RS256", "kid": self.key.kid}
        return jwt.encode(header, claims, self.key)


def touch_session(
    conn: Any,
    identity: TokenIdentity,
    tenant_id: uuid.UUID,
    *,
    idle_timeout_s: int,
    max_s: int,
) -> str | None:
    """Record activity on the token's session; return why it is stale, or None if live.

    Idle: no request for ``idle_timeout_s``. Absolute: ``max_s`` since the session started
    (its first request, or the token's ``iat`` if that is older).
    """
    row = conn.execute(
        "SELECT extract(epoch FROM now() - last_seen), extract(epoch FROM now() - started_at),"
        " subject FROM user_sessions WHERE sid = %s",
        (identity.session_id,),
    ).fetchone()
    age_from_iat = time.time() - identity.issued_at
    if row is None:
        if age_from_iat > max_s:
            return "session exceeded its absolute lifetime"
        conn.execute(
            "INSERT INTO user_sessions (sid, subject, tenant_id, started_at)"
            " VALUES (%s, %s, %s, to_timestamp(%s)) ON CONFLICT (sid) DO UPDATE"
            " SET last_seen = now()",
            (identity.session_id, identity.subject, tenant_id, identity.issued_at),
        )
        return None
    idle, age, subject = float(row[0]), float(row[1]), row[2]
    if subject != identity.subject:
        return "session belongs to someone else"
    if idle > idle_timeout_s:
        return "session idle for too long"
    if max(age, age_from_iat) > max_s:
        return "session exceeded its absolute lifetime"
    conn.execute(
        "UPDATE user_sessions SET last_seen = now() WHERE sid = %s", (identity.session_id,)
    )
    return None
