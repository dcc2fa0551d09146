"""/v1/dead-letters: what the platform stopped retrying, and sending it back (sre, admin)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from orchestrator.api.deps import ServicesDep, audit, require
from orchestrator.errors import BadRequest
from orchestrator.queue import deadletter
from orchestrator.store.db import translate_errors
from orchestrator.store.db.dead_letters import DeadLetter
from orchestrator.store.db.keys import Principal

router = APIRouter(prefix="/v1/dead-letters", tags=["operations"])

Operator = Annotated[Principal, Depends(require("sre"))]
DEFAULT_PAGE_SIZE = 50


class DeadLetterPublic(BaseModel):
    study_id: str
    tenant_id: str
    job_id: str
    reason: str
    attempts: int
    status: str
    created_at: str


class DeadLettersPublic(BaseModel):
    items: list[DeadLetterPublic]
    total: int


class RequeueRequest(BaseModel):
    study_ids: list[UUID] = []
    all: bool = False


class RequeueResult(BaseModel):
    requeued: list[str]


def _public(row: DeadLetter) -> DeadLetterPublic:
    return DeadLetterPublic(
        study_id=str(row.study_id),
        tenant_id=str(row.tenant_id),
        job_id=row.job_id,
        reason=row.reason,
        attempts=row.attempts,
        status=row.status,
        created_at=row.created_at.isoformat(),
    )


@router.get("", response_model=DeadLettersPublic)
def list_dead_letters(
    services: ServicesDep,
    principal: Operator,
    limit: Annotated[int, Query(ge=1, le=200)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeadLettersPublic:
    with translate_errors(), services.pool.connection() as conn:
        rows, total = deadletter.list_items(conn, limit=limit, offset=offset)
    return DeadLettersPublic(items=[_public(r) for r in rows], total=total)


@router.post("/requeue", response_model=RequeueResult)
def requeue_dead_letters(
    request: Request, services: ServicesDep, principal: Operator, body: RequeueRequest
) -> RequeueResult:
    if not body.all and not body.study_ids:
        raise BadRequest("name the studies to requeue in 'study_ids', or send 'all': true")
    ids = deadletter.requeue(
        services.pool,
        services.redis,
        services.settings.queue_name,
        None if body.all else list(body.study_ids),
        job_timeout_s=services.settings.job_timeout_s,
    )
    audit(
        request,
        services,
        principal,
        action="dead_letter.requeue",
        resource_type="study",
        resource_id=",".join(str(i) for i in ids) or None,
        detail={"requeued": len(ids), "all": body.all},
    )
    return RequeueResult(requeued=[str(i) for i in ids])
