"""/v1/webhooks: a tenant's endpoints, their deliveries (dead-letter list) and redelivery.

Integration clients (uploader role) and admins manage their own tenant's endpoints.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AnyHttpUrl, BaseModel, Field

from orchestrator.api.deps import ServicesDep, audit, require
from orchestrator.deliver import webhooks
from orchestrator.errors import PermissionDenied
from orchestrator.security.outbound import OutboundPolicy
from orchestrator.store.db import translate_errors
from orchestrator.store.db.keys import Principal

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

Client = Annotated[Principal, Depends(require("uploader"))]
_DEFAULT = webhooks.Policy()


class WebhookCreate(BaseModel):
    url: AnyHttpUrl
    # Empty: every event.
    events: list[Literal["report.created", "review.closed"]] = []
    max_attempts: Annotated[int, Field(ge=1, le=20)] = _DEFAULT.max_attempts
    backoff_s: Annotated[float, Field(ge=0.1, le=3600)] = _DEFAULT.backoff_s
    timeout_s: Annotated[float, Field(ge=0.1, le=30)] = _DEFAULT.timeout_s
    # Plain http to this endpoint (https otherwise): only an admin may allow it.
    allow_http: bool = False


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.isoformat() if hasattr(v, "isoformat") else str(v) if isinstance(v, UUID) else v)
        for k, v in row.items()
    }


def _act(
    request: Request, services: ServicesDep, principal: Principal, action: str, rid: str
) -> None:
    audit(request, services, principal, action=action, resource_type="webhook", resource_id=rid)


@router.post("", status_code=201)
def create(
    request: Request, services: ServicesDep, principal: Client, body: WebhookCreate
) -> dict[str, Any]:
    """Register an endpoint. The answer holds the signing secret; it is never shown again."""
    policy = webhooks.Policy(body.max_attempts, body.backoff_s, body.timeout_s)
    if body.allow_http and not principal.has_any({"admin"}):
        raise PermissionDenied(
            "plain http for a webhook must be allowed by an admin: register it with an admin"
            " key, or use an https URL"
        )
    # SSRF: the URL must name a public address unless the deployment allows its network.
    OutboundPolicy.from_settings(services.settings).check(
        str(body.url), what="webhook url", allow_http=body.allow_http
    )
    with translate_errors(), services.pool.connection() as conn:
        row, secret = webhooks.create(
            conn,
            principal.tenant_id,
            str(body.url),
            list(body.events),
            policy,
            ring=getattr(services.store, "ring", None),
            allow_http=body.allow_http,
        )
    _act(request, services, principal, "webhook.create", str(row["id"]))
    return {**_public(row), "secret": secret}


@router.get("")
def list_webhooks(services: ServicesDep, principal: Client) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        rows = webhooks.list_endpoints(conn, principal.tenant_id)
    return {"items": [_public(r) for r in rows]}


@router.delete("/{webhook_id}", status_code=204)
def delete(request: Request, services: ServicesDep, principal: Client, webhook_id: UUID) -> None:
    with translate_errors(), services.pool.connection() as conn:
        webhooks.deactivate(conn, principal.tenant_id, webhook_id)
    _act(request, services, principal, "webhook.delete", str(webhook_id))


@router.get("/{webhook_id}/deliveries")
def deliveries(
    services: ServicesDep,
    principal: Client,
    webhook_id: UUID,
    status: Annotated[str | None, Query(pattern="^(pending|delivered|dead)$")] = None,
    limit: Annotated[int, Query(ge=1, le=webhooks.MAX_PAGE)] = 50,
) -> dict[str, Any]:
    """The endpoint's deliveries, newest first; ``status=dead`` is the dead-letter list."""
    with translate_errors(), services.pool.connection() as conn:
        rows = webhooks.deliveries(
            conn, principal.tenant_id, webhook_id, status=status, limit=limit
        )
    return {"items": [_public(r) for r in rows]}


@router.post("/{webhook_id}/deliveries/{delivery_id}/redeliver")
def redeliver(
    request: Request,
    services: ServicesDep,
    principal: Client,
    webhook_id: UUID,
    delivery_id: UUID,
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        row = webhooks.redeliver(conn, principal.tenant_id, webhook_id, delivery_id)
    _act(request, services, principal, "webhook.redeliver", str(delivery_id))
    return _public(row)
