"""/v1/audit (admin: the tenant's audit trail), /v1/break-glass (emergency access) and legal
hold (admin: ``POST /v1/studies/{id}/legal-hold``, ``POST .../legal-hold/release``, each with
a reason, audited; ``GET /v1/legal-holds`` lists the tenant's held studies)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from orchestrator.api.deps import Admin, ServicesDep, audit, require
from orchestrator.privacy import legal_hold
from orchestrator.security import breakglass
from orchestrator.store.db import audit as audit_db
from orchestrator.store.db import translate_errors
from orchestrator.store.db.keys import Principal

router = APIRouter(tags=["admin"])

DEFAULT_PAGE_SIZE = 100
# Integration clients (uploader keys) never break glass; people and operators may.
BreakGlassCaller = Annotated[Principal, Depends(require("reviewer", "ml-engineer", "sre"))]


class AuditPage(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


class BreakGlassRequest(BaseModel):
    role: str
    reason: str = Field(min_length=1, max_length=2000)
    duration_s: int = Field(default=900, ge=1)


class LegalHoldChange(BaseModel):
    reason: str = Field(min_length=1, max_length=legal_hold.REASON_MAX_CHARS)


class LegalHoldsPage(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.isoformat() if isinstance(v, datetime) else str(v) if k.endswith("_id") and v else v)
        for k, v in row.items()
    }


@router.get("/v1/audit", response_model=AuditPage)
def query_audit(
    request: Request,
    services: ServicesDep,
    principal: Admin,
    action: str | None = None,
    principal_name: Annotated[str | None, Query(alias="principal")] = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=audit_db.QUERY_LIMIT_MAX)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditPage:
    # An admin sees their own tenant's trail; the whole platform's is `medtriage audit query`.
    with translate_errors(), services.pool.connection() as conn:
        rows, total = audit_db.query(
            conn,
            tenant_id=principal.tenant_id,
            principal=principal_name,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            outcome=outcome,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
    audit(
        request,
        services,
        principal,
        action="audit.read",
        resource_type="audit",
        resource_id=None,
        detail={"returned": len(rows)},
    )
    return AuditPage(items=[_jsonable(r) for r in rows], total=total, limit=limit, offset=offset)


@router.post("/v1/break-glass", status_code=201)
def break_glass(
    request: Request, services: ServicesDep, principal: BreakGlassCaller, body: BreakGlassRequest
) -> dict[str, Any]:
    try:
        with translate_errors(), services.pool.connection() as conn:
            grant_id, expires_at = breakglass.grant(
                conn,
                tenant_id=principal.tenant_id,
                principal_id=principal.key_id,
                role=body.role,
                reason=body.reason,
                duration=timedelta(seconds=body.duration_s),
                max_duration=timedelta(seconds=services.settings.break_glass_max_s),
            )
    except Exception:
        audit(
            request,
            services,
            principal,
            action="break_glass.grant",
            resource_type="break_glass",
            resource_id=None,
            outcome="refused",
            detail={"role": body.role},
        )
        raise
    audit(
        request,
        services,
        principal,
        action="break_glass.grant",
        resource_type="break_glass",
        resource_id=str(grant_id),
        detail={"role": body.role, "reason": body.reason, "expires_at": expires_at.isoformat()},
    )
    return {"id": str(grant_id), "role": body.role, "expires_at": expires_at.isoformat()}


def _actor(request: Request, principal: Any) -> legal_hold.Actor:
    return legal_hold.Actor(
        name=principal.name,
        principal_id=principal.key_id,
        tenant_id=principal.tenant_id,
        request_id=request.state.request_id,
        source_ip=request.client.host if request.client else None,
    )


@router.post("/v1/studies/{study_id}/legal-hold")
def put_on_legal_hold(
    request: Request, services: ServicesDep, principal: Admin, study_id: UUID, body: LegalHoldChange
) -> dict[str, Any]:
    """Keep the study whatever the retention policies say, until released; audited."""
    with translate_errors(), services.pool.connection() as conn:
        return legal_hold.hold(conn, study_id, reason=body.reason, actor=_actor(request, principal))


@router.post("/v1/studies/{study_id}/legal-hold/release")
def release_legal_hold(
    request: Request, services: ServicesDep, principal: Admin, study_id: UUID, body: LegalHoldChange
) -> dict[str, Any]:
    """Take the study off hold: retention applies again from the next purge; audited."""
    with translate_errors(), services.pool.connection() as conn:
        return legal_hold.release(
            conn, study_id, reason=body.reason, actor=_actor(request, principal)
        )


@router.get("/v1/legal-holds", response_model=LegalHoldsPage)
def list_legal_holds(
    request: Request,
    services: ServicesDep,
    principal: Admin,
    limit: Annotated[int, Query(ge=1, le=legal_hold.LIST_LIMIT_MAX)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> LegalHoldsPage:
    with translate_errors(), services.pool.connection() as conn:
        rows, total = legal_hold.held(
            conn, tenant_id=principal.tenant_id, limit=limit, offset=offset
        )
    audit(
        request,
        services,
        principal,
        action="legal_hold.list",
        resource_type="study",
        resource_id=None,
        detail={"returned": len(rows)},
    )
    return LegalHoldsPage(items=rows, total=total, limit=limit, offset=offset)
