"""The FastAPI application: ``create_app(settings)`` builds it with its services."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator import metrics
from orchestrator.api import metrics_collectors, origin
from orchestrator.api.deps import Services, audit_refused_access, refused_keys
from orchestrator.api.routes import (
    admin,
    dicomweb,
    events,
    exports,
    health,
    models,
    ops,
    review,
    studies,
    webhooks,
)
from orchestrator.api.security_headers import SecurityHeaders
from orchestrator.errors import DependencyUnavailable, MedtriageError, NotFound, PermissionDenied
from orchestrator.ingest.arrivals import Sweeper
from orchestrator.queue import jobs as jobqueue
from orchestrator.security import anchors, refusals
from orchestrator.security.outbound import OutboundPolicy
from orchestrator.settings import ApiSettings
from orchestrator.store.db import connect_pool, upgrade
from orchestrator.store.objects import open_store

log = logging.getLogger(__name__)

# Routes anyone may call: liveness, readiness, metrics and the API description.
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/metrics/targets",
        "/docs",
        "/openapi.json",
        "/docs/oauth2-redirect",
        "/redoc",
        "/review",  # the reviewer page's shell; its data routes need a reviewer key
        "/review/app.js",
        "/review/app.css",
    }
)


def iter_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """Every (path, methods) the app serves, through FastAPI's included-router wrappers."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            context = getattr(route, "include_context", None)
            yield from iter_routes(nested.routes, prefix + getattr(context, "prefix", ""))
        elif hasattr(route, "routes") and not hasattr(route, "methods"):
            yield from iter_routes(route.routes, prefix + getattr(route, "path", ""))
        elif getattr(route, "methods", None):
            yield prefix + route.path, set(route.methods) - {"HEAD", "OPTIONS"}


def _services(settings: ApiSettings) -> Services:
    try:
        upgrade(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - start anyway; /readyz reports the database
        log.warning("database migration skipped at start-up: %s", type(exc).__name__)
    return Services(
        settings=settings,
        pool=connect_pool(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            check_after_s=settings.db_check_after_s,
        ),
        redis=jobqueue.connect(settings.redis_url),
        store=open_store(
            settings.storage_url,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            encryption_keys=settings.storage_encryption_keys,
            s3_sse=settings.s3_sse,
            s3_kms_key_id=settings.s3_kms_key_id,
        ),
    )


def _arrivals_sweeper(services: Services) -> Sweeper:
    # Queues STOW-RS studies once stable or complete (orchestrator/ingest/arrivals.py).
    s = services.settings
    return Sweeper(
        services.pool,
        services.redis,
        s.queue_name,
        stable_age_s=s.ingest_stable_age_s,
        job_timeout_s=s.job_timeout_s,
    )


class RequestContext:
    """Request id (``x-request-id``: the client's if it is a short token, else made), the
    source address (``X-Forwarded-For`` only from trusted proxies: ``api/origin.py``) and
    the request metrics, per route template.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) passes
    every body chunk through extra tasks and streams, which cost an upload about a tenth of
    the API's CPU (benchmarks/profile_stack.py) and buffer streamed responses.
    """

    def __init__(self, app: ASGIApp, *, trusted_proxies: str = "") -> None:
        self.app = app
        self.trusted = origin.parse_trusted(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        request_id = origin.request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        if client:
            forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1")
            source = origin.source_address(client[0], forwarded, self.trusted)
            scope["client"] = (source, client[1])
        started = time.perf_counter()

        def observe(status: int) -> None:
            template = getattr(scope.get("route"), "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(template, str(status)).inc()
            metrics.HTTP_LATENCY.labels(template).observe(time.perf_counter() - started)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", ()),
                        (b"x-request-id", request_id.encode("latin-1")),
                    ],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(settings: ApiSettings) -> FastAPI:
    # A malformed SSRF allow-list fails start-up, not every later registration.
    OutboundPolicy.from_settings(settings)
    origin.parse_trusted(settings.trusted_proxies)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = _services(settings)
        app.state.scrape_registry = metrics_collectors.build_registry(app.state.services)
        sweeper = _arrivals_sweeper(app.state.services).start()
        flusher = refusals.Flusher(refused_keys(app.state.services), app.state.services.pool)
        flusher.start()
        anchorer = anchors.from_settings(
            settings, app.state.services.pool, app.state.services.store
        )
        if anchorer is not None:
            anchorer.start()
        try:
            yield
        finally:
            sweeper.stop()
            flusher.stop()
            if anchorer is not None:
                anchorer.stop()
            app.state.services.pool.close()
            app.state.services.redis.close()

    # Production turns the API description off (settings.docs_enabled).
    docs: dict[str, Any] = (
        {} if settings.docs_enabled else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    )
    app = FastAPI(title="medtriage", version="0.1.0", lifespan=lifespan, **docs)
    app.include_router(health.router)
    app.include_router(studies.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(events.router)
    app.include_router(dicomweb.router)
    app.include_router(review.router)
    app.include_router(review.page_router)
    app.include_router(webhooks.router)
    app.include_router(exports.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(request: Request) -> Response:
        registry = getattr(request.app.state, "scrape_registry", None)
        return Response(metrics_collectors.render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/targets", include_in_schema=False)
    def prometheus_targets(request: Request) -> list[dict[str, Any]]:
        # Prometheus HTTP service discovery: the workers' own metrics endpoints.
        return metrics_collectors.worker_targets(request.app.state.services)

    app.add_middleware(RequestContext, trusted_proxies=settings.trusted_proxies)
    app.add_middleware(SecurityHeaders, tls=bool(settings.tls_certfile and settings.tls_keyfile))

    @app.exception_handler(MedtriageError)
    async def medtriage_error(request: Request, exc: MedtriageError) -> JSONResponse:
        if isinstance(exc, NotFound | PermissionDenied):
            await run_in_threadpool(audit_refused_access, request, exc)
        headers = getattr(exc, "headers", None)  # e.g. RateLimited's Retry-After
        if isinstance(exc, DependencyUnavailable) and headers is None:
            headers = {"Retry-After": "5"}
        if exc.http_status >= 500:
            # The route's template, not the path: paths may carry a StudyInstanceUID.
            template = getattr(request.scope.get("route"), "path", "unmatched")
            log.warning("%s %s -> %s", request.method, template, type(exc).__name__)
        return JSONResponse(
            status_code=exc.http_status,
            content={"error": type(exc).__name__, "detail": exc.message},
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input back; that input may carry PHI.
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        return JSONResponse(
            status_code=422, content={"error": "ValidationError", "detail": problems}
        )

    return app
