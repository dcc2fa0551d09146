"""PACS export of reports: a tenant's targets (admin) and sending a report's SR (reviewer)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from orchestrator.api.deps import Admin, ServicesDep, audit, require
from orchestrator.deliver import pacs
from orchestrator.errors import NotFound
from orchestrator.security.outbound import OutboundPolicy
from orchestrator.store.db import studies as db
from orchestrator.store.db import translate_errors
from orchestrator.store.db.keys import Principal

router = APIRouter(prefix="/v1", tags=["exports"])

Reviewer = Annotated[Principal, Depends(require("reviewer"))]


class TargetCreate(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    # DICOMweb base URL; STOW-RS goes to {stow_url}/studies.
    stow_url: Annotated[str, Field(max_length=2000)]
    # Plain http to this target (https otherwise); only admins register targets.
    allow_http: bool = False


class ExportRequest(BaseModel):
    # None: every target of the tenant.
    target: str | None = None
    # None: the newest revision.
    revision: Annotated[int | None, Field(ge=1)] = None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.isoformat() if hasattr(v, "isoformat") else str(v) if isinstance(v, UUID) else v)
        for k, v in row.items()
    }


def _outbound(services: ServicesDep) -> OutboundPolicy:
    return OutboundPolicy.from_settings(services.settings)


@router.post("/pacs-targets", status_code=201)
def add_target(
    request: Request, services: ServicesDep, principal: Admin, body: TargetCreate
) -> dict[str, Any]:
    _outbound(services).check(body.stow_url, what="stow_url", allow_http=body.allow_http)
    with translate_errors(), services.pool.connection() as conn:
        row = pacs.add_target(
            conn, principal.tenant_id, body.name, body.stow_url, allow_http=body.allow_http
        )
    audit(
        request,
        services,
        principal,
        action="pacs_target.add",
        resource_type="pacs_target",
        resource_id=body.name,
    )
    return _public(row)


@router.get("/pacs-targets")
def list_targets(services: ServicesDep, principal: Admin) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        rows = pacs.targets(conn, principal.tenant_id)
    return {"items": [_public(r) for r in rows]}


@router.post("/studies/{study_id}/report/export")
def export_report(
    request: Request,
    services: ServicesDep,
    principal: Reviewer,
    study_id: UUID,
    body: ExportRequest,
) -> dict[str, Any]:
    """STOW-RS the report's DICOM SR to the tenant's PACS target(s); 502 when all fail."""
    with translate_errors(), services.pool.connection() as conn:
        if db.get_study(conn, study_id, tenant_id=principal.tenant_id) is None:
            raise NotFound(f"study {study_id} not found")
    with translate_errors():
        exports = pacs.export_report(
            services.pool,
            services.store,
            principal.tenant_id,
            study_id,
            target=body.target,
            revision=body.revision,
            outbound=_outbound(services),
        )
    audit(
        request,
        services,
        principal,
        action="report.export",
        resource_type="study",
        resource_id=str(study_id),
        detail={"targets": [e.target for e in exports], "outcomes": [e.outcome for e in exports]},
    )
    if all(e.outcome == "failed" for e in exports):
        raise pacs.ExportFailed("; ".join(f"{e.target}: {e.detail}" for e in exports))
    return {"exports": [asdict(e) for e in exports]}
