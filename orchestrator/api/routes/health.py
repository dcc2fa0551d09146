"""/healthz (the process is up) and /readyz (its dependencies answer)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from orchestrator.api.deps import ServicesDep
from orchestrator.store.db import models as models_db
from orchestrator.store.db.pool import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_postgres(services: Any) -> None:
    with services.pool.connection(timeout=services.settings.readiness_timeout_s) as conn:
        ping(conn)


def _check_redis(services: Any) -> None:
    services.redis.ping()


def _check_triton(services: Any) -> None:
    url = services.settings.triton_http_url.rstrip("/") + "/v2/health/ready"
    response = httpx.get(url, timeout=services.settings.readiness_timeout_s)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}")


def _check_store(services: Any) -> None:
    services.store.ping()


class _Skipped(Exception):
    """The check could not run because another dependency is down (reported there)."""


class _NotLoaded(Exception):
    pass


def _check_models(services: Any) -> None:
    """Every version a route or shadow points to is loaded in Triton (a version unloaded
    behind the API's back fails every tenant's studies routed to it)."""
    timeout = services.settings.readiness_timeout_s
    try:
        with services.pool.connection(timeout=timeout) as conn:
            routed = models_db.routed_versions(conn)
        url = services.settings.triton_http_url.rstrip("/") + "/v2/repository/index"
        index = httpx.post(url, json={}, timeout=timeout).json()
    except Exception as exc:  # noqa: BLE001 - postgresql / triton are reported on their own
        raise _Skipped from exc
    loaded = {(m.get("name"), int(m["version"])) for m in index if m.get("state") == "READY"}
    missing = [
        f"{model} v{version}" + (" (shadow)" if shadow else "")
        for model, version, shadow in routed
        if (model, int(version)) not in loaded
    ]
    if missing:
        raise _NotLoaded("routed but not loaded: " + ", ".join(missing))


_CHECKS = {
    "postgresql": _check_postgres,
    "redis": _check_redis,
    "triton": _check_triton,
    "object_store": _check_store,
    "models": _check_models,
}


@router.get("/readyz")
def readyz(services: ServicesDep) -> JSONResponse:
    def run(item: tuple[str, Any]) -> tuple[str, str]:
        name, check = item
        try:
            check(services)
            return name, "ok"
        except _Skipped:
            return name, "skipped"
        except _NotLoaded as exc:
            return name, f"down: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure means "down"; say which
            return name, f"down: {type(exc).__name__}"

    with ThreadPoolExecutor(max_workers=len(_CHECKS)) as pool:
        checks = dict(pool.map(run, _CHECKS.items()))
    down = [name for name, state in checks.items() if state.startswith("down")]
    body = {"status": "ready" if not down else "not ready", "checks": checks, "down": down}
    return JSONResponse(status_code=200 if not down else 503, content=body)
