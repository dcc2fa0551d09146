"""Server-Sent Events: ``/v1/studies/{id}/events`` (one study, ends when it finishes) and
``/v1/events`` (every study of the caller's tenant, for dashboards).

The API subscribes to the Redis channels workers publish on (orchestrator/deliver/events.py) and
relays them. It subscribes *before* reading the study's stored state, so no stage change
can fall between the snapshot it sends first and the live events that follow. Database work
(the study check, the audit row, the snapshot) runs in the thread pool, never on the event
loop that every other request shares.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis as AsyncRedis
from starlette.concurrency import run_in_threadpool

from orchestrator import lifecycle
from orchestrator.api.deps import Reader, ServicesDep, audit
from orchestrator.deliver import events
from orchestrator.errors import NotFound
from orchestrator.store.db import studies as db
from orchestrator.store.db import translate_errors

router = APIRouter(tags=["events"])

# A comment line this often keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_S = 15.0
# How long one wait for a message lasts before checking whether the client went away.
POLL_S = 1.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _relay(
    request: Request,
    redis_url: str,
    channel: str,
    first: Callable[[], tuple[list[bytes], bool]],
    *,
    until_terminal: bool,
) -> AsyncIterator[bytes]:
    """Subscribe, then send ``first()`` (chunks, already finished?), then relay messages."""
    client = AsyncRedis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        chunks, finished = await run_in_threadpool(first)
        for chunk in chunks:
            yield chunk
        if until_terminal and finished:
            return
        idle = 0.0
        while not await request.is_disconnected():
            message = await pubsub.get_message(timeout=POLL_S)
            if message is None:
                idle += POLL_S
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield b": keepalive\n\n"
                continue
            idle = 0.0
            data = json.loads(message["data"])
            yield _sse("stage", data)
            if until_terminal and data.get("status") in lifecycle.TERMINAL_VALUES:
                return
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


@router.get("/v1/studies/{study_id}/events")
async def study_events(
    request: Request, services: ServicesDep, principal: Reader, study_id: UUID
) -> StreamingResponse:
    settings = services.settings

    def snapshot() -> tuple[list[bytes], bool]:
        with translate_errors(), services.pool.connection() as conn:
            row = db.get_study(conn, study_id, tenant_id=principal.tenant_id)
        status = str(row["status"]) if row is not None else "failed"
        return [_sse("status", events.payload(study_id, "snapshot", status))], (
            status in lifecycle.TERMINAL_VALUES
        )

    def check() -> None:
        with translate_errors(), services.pool.connection() as conn:
            if db.get_study(conn, study_id, tenant_id=principal.tenant_id) is None:
                raise NotFound(f"study {study_id} not found")
        audit(
            request,
            services,
            principal,
            action="study.events",
            resource_type="study",
            resource_id=str(study_id),
        )

    await run_in_threadpool(check)
    channel = events.study_channel(settings.queue_prefix, study_id)
    return StreamingResponse(
        _relay(request, settings.redis_url, channel, snapshot, until_terminal=True),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


@router.get("/v1/events")
async def tenant_events(
    request: Request, services: ServicesDep, principal: Reader
) -> StreamingResponse:
    settings = services.settings
    channel = events.tenant_channel(settings.queue_prefix, principal.tenant_id)

    def hello() -> tuple[list[bytes], bool]:
        return [_sse("hello", {"tenant_feed": True})], False

    await run_in_threadpool(
        audit,
        request,
        services,
        principal,
        action="events.feed",
        resource_type="study",
        resource_id=None,
    )
    return StreamingResponse(
        _relay(request, settings.redis_url, channel, hello, until_terminal=False),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )
