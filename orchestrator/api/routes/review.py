"""/v1/review: the clinicians' queue, claims, verdicts, ground-truth figures.

Reviewers only (admin passes). JSON for integrations; ``.../view`` routes answer the same
data as server-rendered HTML fragments for the reviewer page (orchestrator/api/review_page.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from psycopg import Connection
from pydantic import BaseModel, Field

from orchestrator.api import review_page as render
from orchestrator.api.deps import ServicesDep, audit, require
from orchestrator.deliver import webhooks
from orchestrator.inference.specs import ModelSpec, load_repository
from orchestrator.reports import regenerate
from orchestrator.store.db import translate_errors
from orchestrator.store.db.keys import Principal
from orchestrator.triage import review
from orchestrator.triage.applicability import load_sets

router = APIRouter(prefix="/v1/review", tags=["review"])
# The page shell carries no data (it fetches the fragments below with the reviewer's key).
page_router = APIRouter(include_in_schema=False)
# The page's script and style change only with a deployment; revalidated on each load.
_ASSET_CACHE = {"Cache-Control": "no-cache"}

Reviewer = Annotated[Principal, Depends(require("reviewer"))]
# Model whose labels a reviewer's override must use (the triage model's).
REVIEW_MODEL = "triage"


class VerdictIn(BaseModel):
    verdict: Literal["agree", "override"]
    correct_label: str | None = None
    note: Annotated[str | None, Field(max_length=review.MAX_NOTE_CHARS)] = None


def _public(case: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in case.items():
        if k == "claimed_by":
            continue
        out[k] = (
            v.isoformat() if hasattr(v, "isoformat") else (str(v) if k in ("id", "study_id") else v)
        )
    return out


def _labels(services: ServicesDep, results: list[dict[str, Any]] | None = None) -> tuple[str, ...]:
    """The labels a verdict may name: those of the case's model set's first model (the chest
    triage model's when the case has no live result)."""
    repo = load_repository(services.settings.model_repository)
    entry = {s.models[0] for s in load_sets(services.settings.model_repository, repo)}
    for r in results or []:
        if r["arm"] == "live" and r["model"] in entry:
            return repo[r["model"]].labels
    return repo[REVIEW_MODEL].labels


def _attention(repo: dict[str, ModelSpec], r: dict[str, Any]) -> list[list[float]] | None:
    spec = repo.get(r["model"])
    name = spec.attention_output if spec is not None else None
    grid = (r.get("outputs") or {}).get(name) if name else None
    return grid if isinstance(grid, list) else None


def _case_view(services: ServicesDep, principal: Principal, case_id: UUID) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        case = review.get_case(conn, principal.tenant_id, case_id)
        results = review.case_results(conn, case["study_id"])
    repo = load_repository(services.settings.model_repository)
    out = _public(case)
    out["results"] = [
        {
            **{k: v for k, v in r.items() if k != "outputs"},
            "instance_id": str(r["instance_id"]),
            "confidence": round(float(r["confidence"]), 4),
            # The model's attention map for the reviewer's overlay (not a localisation).
            "attention": _attention(repo, r),
        }
        for r in results
    ]
    out["labels"] = list(_labels(services, results))
    out["mine"] = case["claimed_by"] == principal.key_id
    return out


@page_router.get("/review", response_class=HTMLResponse)
def review_page() -> HTMLResponse:
    return HTMLResponse(render.page(), headers={"Cache-Control": "no-store"})


# The page's script and style are served, not inline, so its policy allows no inline code.
@page_router.get("/review/app.js", include_in_schema=False)
def review_script() -> Response:
    return Response(render.SCRIPT, media_type="text/javascript", headers=_ASSET_CACHE)


@page_router.get("/review/app.css", include_in_schema=False)
def review_style() -> Response:
    return Response(render.STYLE, media_type="text/css", headers=_ASSET_CACHE)


@router.get("/queue")
def list_queue(
    request: Request,
    services: ServicesDep,
    principal: Reviewer,
    status: Annotated[str, Query(pattern="^(open|claimed|closed|active)$")] = "active",
    limit: Annotated[int, Query(ge=1, le=review.MAX_QUEUE_PAGE)] = 50,
) -> dict[str, Any]:
    statuses = ("open", "claimed") if status == "active" else (status,)
    with translate_errors(), services.pool.connection() as conn:
        rows = review.queue(conn, principal.tenant_id, statuses=statuses, limit=limit)
    audit(
        request,
        services,
        principal,
        action="review.list",
        resource_type="review_case",
        resource_id=None,
        detail={"returned": len(rows)},
    )
    return {"items": [_public(r) for r in rows]}


@router.get("/queue/view", response_class=HTMLResponse)
def queue_view(request: Request, services: ServicesDep, principal: Reviewer) -> HTMLResponse:
    with translate_errors(), services.pool.connection() as conn:
        rows = review.queue(conn, principal.tenant_id)
    # The queue page shows the same study details as /queue: audited the same way.
    audit(
        request,
        services,
        principal,
        action="review.list",
        resource_type="review_case",
        resource_id=None,
        detail={"returned": len(rows)},
    )
    return HTMLResponse(render.queue([_public(r) for r in rows]))


@router.get("/cases/{case_id}")
def get_case(
    request: Request, services: ServicesDep, principal: Reviewer, case_id: UUID
) -> dict[str, Any]:
    out = _case_view(services, principal, case_id)
    audit(
        request,
        services,
        principal,
        action="review.read",
        resource_type="review_case",
        resource_id=str(case_id),
    )
    return out


@router.get("/cases/{case_id}/view", response_class=HTMLResponse)
def case_view(
    request: Request, services: ServicesDep, principal: Reviewer, case_id: UUID
) -> HTMLResponse:
    out = _case_view(services, principal, case_id)
    audit(
        request,
        services,
        principal,
        action="review.read",
        resource_type="review_case",
        resource_id=str(case_id),
    )
    return HTMLResponse(render.case(out))


def _act(
    request: Request,
    services: ServicesDep,
    principal: Principal,
    action: str,
    case_id: UUID,
    fn: Any,
) -> dict[str, Any]:
    try:
        with translate_errors(), services.pool.connection() as conn:
            case = fn(conn)
    except review.ReviewConflict:
        audit(
            request,
            services,
            principal,
            action=action,
            resource_type="review_case",
            resource_id=str(case_id),
            outcome="conflict",
        )
        raise
    audit(
        request,
        services,
        principal,
        action=action,
        resource_type="review_case",
        resource_id=str(case_id),
    )
    return _public(case)


@router.post("/cases/{case_id}/claim")
def claim(
    request: Request, services: ServicesDep, principal: Reviewer, case_id: UUID
) -> dict[str, Any]:
    return _act(
        request,
        services,
        principal,
        "review.claim",
        case_id,
        lambda conn: review.claim(conn, principal.tenant_id, case_id, principal),
    )


@router.post("/cases/{case_id}/release")
def release(
    request: Request, services: ServicesDep, principal: Reviewer, case_id: UUID
) -> dict[str, Any]:
    return _act(
        request,
        services,
        principal,
        "review.release",
        case_id,
        lambda conn: review.release(conn, principal.tenant_id, case_id, principal),
    )


@router.post("/cases/{case_id}/verdict")
def verdict(
    request: Request, services: ServicesDep, principal: Reviewer, case_id: UUID, body: VerdictIn
) -> dict[str, Any]:
    """Close the case. The verdict, the report revision it causes and the webhook notices
    commit in one transaction: if any part fails, nothing changes."""

    def close(conn: Connection) -> dict[str, Any]:
        # The labels of the case's own model set (a breast case takes breast labels).
        study_id = review.get_case(conn, principal.tenant_id, case_id)["study_id"]
        labels = _labels(services, review.case_results(conn, study_id))
        case = review.record_verdict(
            conn,
            principal.tenant_id,
            case_id,
            principal,
            verdict=body.verdict,
            correct_label=body.correct_label,
            note=body.note,
            labels=labels,
        )
        revision = regenerate.write_revision(conn, services.store, case["study_id"])
        webhooks.emit(
            conn,
            principal.tenant_id,
            webhooks.REVIEW_CLOSED,
            {
                "case_id": str(case["id"]),
                "study_id": str(case["study_id"]),
                "verdict": case["verdict"],
                "correct_label": case["correct_label"],
                "report_revision": revision,
                "report_url": f"/v1/studies/{case['study_id']}/report",
            },
        )
        return {**case, "report_revision": revision}

    out = _act(request, services, principal, "review.verdict", case_id, close)
    with translate_errors(), services.pool.connection() as conn:
        review.publish_figures(conn)
    return out


@router.get("/stats")
def stats(
    services: ServicesDep,
    principal: Reviewer,
    model: Annotated[str, Query(pattern="^[A-Za-z0-9_.-]{1,64}$")] = REVIEW_MODEL,
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        rows = review.stats_dicts(conn, model, tenant_id=principal.tenant_id)
        review.publish_figures(conn)
    return {"model": model, "versions": rows}
