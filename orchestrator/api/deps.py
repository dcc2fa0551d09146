"""Request-scoped dependencies: the app's services, the caller's identity and role checks.

A caller is an API key (``mt_<prefix>_<secret>``, integration clients and services) or a
person's OIDC bearer token (a JWT checked against the configured issuer's JWKS). Refused
keys are limited per source before any lookup and audited in aggregate, one row per source
and interval (``security/refusals.py``); every accepted caller is rate limited per
principal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, Request
from psycopg import Connection
from psycopg_pool import ConnectionPool
from redis import Redis
from redis.exceptions import RedisError

from orchestrator.errors import (
    AuthenticationError,
    DependencyUnavailable,
    MedtriageError,
    NotFound,
    PermissionDenied,
)
from orchestrator.ingest.core import FileOutcome
from orchestrator.security import breakglass, oidc, refusals
from orchestrator.security.ratelimit import RateLimited, RateLimiter
from orchestrator.settings import ApiSettings
from orchestrator.store.db import keys, translate_errors
from orchestrator.store.db.audit import record, record_upload, tally
from orchestrator.store.db.keys import Principal
from orchestrator.store.objects import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: ApiSettings
    pool: ConnectionPool
    redis: Redis
    store: ObjectStore
    # Built on first use from settings (see _verifier / _limiter).
    cache: dict[str, Any] = field(default_factory=dict)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def _verifier(services: Services) -> oidc.Verifier | None:
    s = services.settings
    if not (s.oidc_issuer and s.oidc_jwks_file):
        return None
    if "verifier" not in services.cache:
        services.cache["verifier"] = oidc.Verifier(
            issuer=s.oidc_issuer,
            audience=s.oidc_audience,
            jwks=oidc.load_jwks(s.oidc_jwks_file),
            role_claim=s.oidc_role_claim,
            tenant_claim=s.oidc_tenant_claim,
        )
    verifier: oidc.Verifier = services.cache["verifier"]
    return verifier


def _limiter(services: Services) -> RateLimiter:
    if "limiter" not in services.cache:
        s = services.settings
        services.cache["limiter"] = RateLimiter(
            services.redis, s.queue_prefix, rate_per_s=s.rate_limit_per_s, burst=s.rate_limit_burst
        )
    limiter: RateLimiter = services.cache["limiter"]
    return limiter


def refused_keys(services: Services) -> refusals.RefusedKeys:
    if "refused" not in services.cache:
        services.cache["refused"] = refusals.from_services(services)
    refused: refusals.RefusedKeys = services.cache["refused"]
    return refused


def _person(services: Services, conn: Any, token: str) -> tuple[Principal | None, str]:
    verifier = _verifier(services)
    if verifier is None:
        return None, "bearer tokens are not configured"
    try:
        identity = verifier.verify(token)
    except oidc.TokenInvalid as exc:
        return None, str(exc)
    if identity.role not in keys.ROLES:
        return None, "token role unknown"
    tenant_id = keys.tenant_id(conn, identity.tenant)
    if tenant_id is None:
        return None, "token tenant unknown"
    s = services.settings
    stale = oidc.touch_session(
        conn, identity, tenant_id, idle_timeout_s=s.session_idle_timeout_s, max_s=s.session_max_s
    )
    if stale:
        return None, stale
    principal = Principal(
        key_id=identity.principal_id,
        tenant_id=tenant_id,
        name=f"person:{identity.subject}",
        role=identity.role,
        kind="person",
    )
    return principal, ""


def _source(request: Request) -> str | None:
    return request.client.host if request.client else None


def authenticate(request: Request, services: ServicesDep) -> Principal:
    token = _presented_key(request)
    reason = "missing key or token"
    source = _source(request)
    try:
        try:
            refused_keys(services).check(source)
        except RateLimited:
            refused_keys(services).refused(source, "rate limited")
            raise
    except RedisError as exc:
        raise DependencyUnavailable("redis", type(exc).__name__) from exc
    with translate_errors(), services.pool.connection() as conn:
        principal: Principal | None = None
        if token and oidc.looks_like_jwt(token):
            principal, reason = _person(services, conn, token)
        elif token:
            principal = keys.authenticate(conn, token)
            reason = "invalid, revoked or expired key"
        if principal is not None:
            extra = breakglass.active_roles(conn, principal.key_id, principal.tenant_id)
            if extra:
                principal = Principal(**{**principal.__dict__, "extra_roles": extra})
                record(
                    conn,
                    tenant_id=principal.tenant_id,
                    principal_id=principal.key_id,
                    principal=principal.name,
                    action="break_glass.use",
                    resource_type="api",
                    resource_id=request.url.path,
                    outcome="ok",
                    request_id=request.state.request_id,
                    source_ip=_source(request),
                    detail={"method": request.method, "roles": list(extra)},
                )
    if principal is None:
        try:
            refused_keys(services).refused(source, reason)
        except RedisError as exc:
            raise DependencyUnavailable("redis", type(exc).__name__) from exc
        raise AuthenticationError(
            f"missing or invalid API key or token ({reason}): send 'Authorization: Bearer <key>' "
            "(create one with `medtriage keys create --role ...`)"
        )
    try:
        _limiter(services).hit(str(principal.key_id))
    except RedisError as exc:
        raise DependencyUnavailable("redis", type(exc).__name__) from exc
    request.state.principal = principal
    return principal


def require(*roles: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Dependency: the caller holds one of ``roles`` (admin always passes)."""
    allowed = set(roles) | {"admin"}

    async def _check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.has_any(allowed):
            raise PermissionDenied(
                f"role {principal.role!r} may not do this; needs one of {sorted(allowed)}"
            )
        return principal

    _check.allowed_roles = frozenset(allowed)  # type: ignore[attr-defined]
    return _check


def require_platform(*roles: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Dependency: a platform key holding ``platform-<role>`` (platform-admin always passes).

    For what every tenant shares: a tenant's keys, admin included, are refused."""
    allowed = {f"platform-{r}" for r in roles} | {"platform-admin"}

    async def _check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in allowed:
            raise PermissionDenied(
                f"this changes what every tenant gets (model routes, shadows, thresholds and"
                f" loaded versions are platform-wide), so it needs a platform key with one of"
                f" {sorted(allowed)}; role {principal.role!r} acts only within its own tenant"
                f" (create one with `medtriage keys create --role platform-{roles[0]}`)"
            )
        return principal

    _check.allowed_roles = frozenset(allowed)  # type: ignore[attr-defined]
    return _check


Uploader = Annotated[Principal, Depends(require("uploader"))]
Reader = Annotated[Principal, Depends(require("uploader", "reviewer", "ml-engineer"))]
Admin = Annotated[Principal, Depends(require("admin"))]
# Anyone authenticated (the route decides what they see).
Anyone = Annotated[Principal, Depends(authenticate)]


def audit(
    request: Request,
    services: Services,
    principal: Principal,
    *,
    action: str,
    resource_type: str,
    resource_id: str | None,
    outcome: str = "ok",
    detail: dict[str, Any] | None = None,
    conn: Connection | None = None,
) -> None:
    """One audit row, in ``conn``'s transaction when given (it commits with the caller's
    work), else in its own."""
    with contextlib.ExitStack() as own:
        if conn is None:
            own.enter_context(translate_errors())
            conn = own.enter_context(services.pool.connection())
        record(
            conn,
            tenant_id=principal.tenant_id,
            principal_id=principal.key_id,
            principal=principal.name,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            outcome=outcome,
            request_id=request.state.request_id,
            source_ip=_source(request),
            detail=detail,
        )


def _opaque_ids(request: Request) -> dict[str, str]:
    """The path's opaque ids (UUIDs: study, case, webhook...); never a DICOM UID or a name."""
    out = {}
    for name, value in request.path_params.items():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            out[name] = str(UUID(str(value)))
    return out


def audit_refused_access(request: Request, exc: MedtriageError) -> None:
    """A signed-in caller refused (403) or answered 404: one PHI-free row (the route's
    template, the opaque ids asked for, the caller's role), so probing another tenant's ids
    or reaching past one's role leaves a trace. Failing to write it never changes the
    answer."""
    principal: Principal | None = getattr(request.state, "principal", None)
    services: Services | None = getattr(request.app.state, "services", None)
    if principal is None or services is None:
        return
    template = getattr(request.scope.get("route"), "path", None)
    try:
        with services.pool.connection() as conn:
            record(
                conn,
                tenant_id=principal.tenant_id,
                principal_id=principal.key_id,
                principal=principal.name,
                action="access.refused",
                resource_type="api",
                resource_id=template,
                outcome="not_found" if isinstance(exc, NotFound) else "denied",
                request_id=request.state.request_id,
                source_ip=_source(request),
                detail={
                    "method": request.method,
                    "status": exc.http_status,
                    "role": principal.role,
                    "ids": _opaque_ids(request),
                },
            )
    except Exception as failure:  # noqa: BLE001 - the refusal stands; say the audit failed
        log.warning("refused access not audited: %s", type(failure).__name__)


def audit_upload(
    request: Request,
    services: Services,
    principal: Principal,
    *,
    action: str,
    files: Iterable[FileOutcome],
    detail: dict[str, Any],
    conn: Connection | None = None,
) -> None:
    """The audit rows of an upload that may span many studies: one per study (see
    ``db.audit.record_upload``), sharing this request's id."""
    with contextlib.ExitStack() as own:
        if conn is None:
            own.enter_context(translate_errors())
            conn = own.enter_context(services.pool.connection())
        record_upload(
            conn,
            studies=tally((f.study_id, f.outcome) for f in files),
            tenant_id=principal.tenant_id,
            principal_id=principal.key_id,
            principal=principal.name,
            action=action,
            request_id=request.state.request_id,
            source_ip=_source(request),
            detail=detail,
        )
