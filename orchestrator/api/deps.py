"""Request-scoped dependencies: the app's services, the caller's identity and role checks."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from psycopg_pool import ConnectionPool
from redis import Redis

from orchestrator.db import keys, translate_errors
from orchestrator.db.audit import record
from orchestrator.db.keys import Principal
from orchestrator.errors import AuthenticationError, PermissionDenied
from orchestrator.settings import ApiSettings
from orchestrator.storage import ObjectStore


@dataclass
class Services:
    settings: ApiSettings
    pool: ConnectionPool
    redis: Redis
    store: ObjectStore


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def authenticate(request: Request, services: ServicesDep) -> Principal:
    key = _presented_key(request)
    with translate_errors(), services.pool.connection() as conn:
        principal = keys.authenticate(conn, key) if key else None
        if principal is None:
            record(
                conn,
                principal="anonymous",
                action="authenticate",
                resource_type="api",
                resource_id=request.url.path,
                outcome="denied",
                request_id=request.state.request_id,
                source_ip=request.client.host if request.client else None,
                detail={"reason": "missing key" if not key else "invalid, revoked or expired key"},
            )
    if principal is None:
        raise AuthenticationError(
            "missing or invalid API key: send 'Authorization: Bearer <key>' "
            "(create one with `medtriage keys create --role ...`)"
        )
    request.state.principal = principal
    return principal


def require(*roles: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Dependency: the caller holds one of ``roles`` (admin always passes)."""
    allowed = set(roles) | {"admin"}

    async def _check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role not in allowed:
            raise PermissionDenied(
                f"role {principal.role!r} may not do this; needs one of {sorted(allowed)}"
            )
        return principal

    return _check


Uploader = Annotated[Principal, Depends(require("uploader"))]
Reader = Annotated[Principal, Depends(require("uploader", "reviewer", "ml-engineer"))]


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
) -> None:
    with translate_errors(), services.pool.connection() as conn:
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
            source_ip=request.client.host if request.client else None,
            detail=detail,
        )
