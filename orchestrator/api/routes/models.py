"""/v1/models: rollout state (ML engineers and sre of any tenant may read) and actions.

Routes, shadows, thresholds and the versions loaded in Triton are shared by every tenant, so
changing them takes a platform key (``platform-ml-engineer`` / ``platform-admin``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from orchestrator.api.deps import ServicesDep, audit, require, require_platform
from orchestrator.errors import Conflict, NotFound
from orchestrator.inference import rollout, routing
from orchestrator.inference.model_control import TritonControl
from orchestrator.inference.specs import load_repository
from orchestrator.security.tls import GrpcTls
from orchestrator.store.db import translate_errors
from orchestrator.store.db.keys import Principal
from orchestrator.triage import gate, review

router = APIRouter(prefix="/v1/models", tags=["models"])

MlEngineer = Annotated[Principal, Depends(require_platform("ml-engineer"))]
ModelReader = Annotated[
    Principal, Depends(require("ml-engineer", "sre", "platform-ml-engineer", "platform-admin"))
]


class RoutesUpdate(BaseModel):
    weights: dict[int, Annotated[int, Field(ge=0, le=100)]]


class ThresholdsUpdate(BaseModel):
    # 0: the model's default for every version without its own row.
    version: Annotated[int, Field(ge=0)] = 0
    min_confidence: Annotated[float, Field(ge=0, le=1)]
    max_entropy: Annotated[float, Field(ge=0)] = gate.DEFAULT_MAX_ENTROPY
    critical_probability: Annotated[float, Field(ge=0, le=1)] = gate.DEFAULT_CRITICAL_PROBABILITY


class PromoteRequest(BaseModel):
    force: bool = False


def _control(services: ServicesDep) -> TritonControl:
    settings = services.settings
    return TritonControl(settings.triton_grpc_url, tls=GrpcTls.from_settings(settings))


def _routes(routes: list[routing.Route]) -> list[dict[str, Any]]:
    return [asdict(r) for r in routes]


@router.get("")
def list_models(services: ServicesDep, principal: ModelReader) -> dict[str, Any]:
    repo = load_repository(services.settings.model_repository)
    control = _control(services)
    try:
        out = []
        with translate_errors(), services.pool.connection() as conn:
            routing.sync_versions(conn, {m: s.versions for m, s in repo.items()})
            for model, spec in sorted(repo.items()):
                out.append(
                    {
                        "model": model,
                        "versions": list(spec.versions),
                        "loaded": sorted(control.loaded_versions(model)),
                        "routes": _routes(routing.load_routes(conn, model)),
                        "gate": asdict(rollout.get_gate(conn, model)),
                    }
                )
        return {"models": out}
    finally:
        control.close()


def _act(
    request: Request,
    services: ServicesDep,
    principal: Principal,
    action: str,
    model: str,
    detail: dict[str, Any],
) -> None:
    audit(
        request,
        services,
        principal,
        action=f"model.{action}",
        resource_type="model",
        resource_id=model,
        detail=detail,
    )


@router.put("/{model}/routes")
def set_routes(
    request: Request, services: ServicesDep, principal: MlEngineer, model: str, body: RoutesUpdate
) -> dict[str, Any]:
    control = _control(services)
    try:
        loaded = control.loaded_versions(model)
    finally:
        control.close()
    with translate_errors(), services.pool.connection() as conn:
        routes = rollout.set_weights(conn, model, body.weights, actor=principal.name, loaded=loaded)
    _act(request, services, principal, "route", model, {"weights": body.weights})
    return {"model": model, "routes": _routes(routes)}


@router.post("/{model}/shadows/{version}")
def add_shadow(
    request: Request, services: ServicesDep, principal: MlEngineer, model: str, version: int
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        routes = rollout.add_shadow(conn, model, version, actor=principal.name)
    _act(request, services, principal, "shadow_add", model, {"version": version})
    return {"model": model, "routes": _routes(routes)}


@router.delete("/{model}/shadows/{version}")
def remove_shadow(
    request: Request, services: ServicesDep, principal: MlEngineer, model: str, version: int
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        routes = rollout.remove_shadow(conn, model, version, actor=principal.name)
    _act(request, services, principal, "shadow_remove", model, {"version": version})
    return {"model": model, "routes": _routes(routes)}


@router.get("/{model}/compare")
def compare(
    services: ServicesDep,
    principal: ModelReader,
    model: str,
    versions: Annotated[list[int], Query()],
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        stats = rollout.compare(conn, model, versions)
        # Ground truth from clinicians' verdicts (every tenant: the model is shared).
        reviewed = review.figures_by_version(conn, model)
    empty = dict.fromkeys(review.FIGURES)
    return {
        "model": model,
        "versions": [{**asdict(s), **reviewed.get(s.version, empty)} for s in stats],
    }


@router.post("/{model}/versions/{version}/promote")
def promote(
    request: Request,
    services: ServicesDep,
    principal: MlEngineer,
    model: str,
    version: int,
    body: PromoteRequest | None = None,
) -> dict[str, Any]:
    force = bool(body and body.force)
    control = _control(services)
    try:
        loaded = control.loaded_versions(model)
    finally:
        control.close()
    try:
        with translate_errors(), services.pool.connection() as conn:
            routes = rollout.promote(
                conn, model, version, actor=principal.name, force=force, loaded=loaded
            )
    except rollout.GateFailed:
        _act(
            request,
            services,
            principal,
            "promote",
            model,
            {"version": version, "outcome": "refused"},
        )
        raise
    _act(request, services, principal, "promote", model, {"version": version, "forced": force})
    return {"model": model, "routes": _routes(routes)}


@router.post("/{model}/rollback")
def rollback(
    request: Request, services: ServicesDep, principal: MlEngineer, model: str
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        routes = rollout.rollback(conn, model, actor=principal.name)
    _act(request, services, principal, "rollback", model, {})
    return {"model": model, "routes": _routes(routes)}


@router.post("/{model}/versions/{version}/load")
def load(
    request: Request, services: ServicesDep, principal: MlEngineer, model: str, version: int
) -> dict[str, Any]:
    control = _control(services)
    try:
        loaded = control.load(model, version)
    finally:
        control.close()
    _act(request, services, principal, "load", model, {"version": version})
    return {"model": model, "loaded": sorted(loaded)}


@router.post("/{model}/versions/{version}/unload")
def unload(
    request: Request, services: ServicesDep, principal: MlEngineer, model: str, version: int
) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        routed = rollout.routed_to(model, version, routing.load_routes(conn, model))
    if routed:
        _act(request, services, principal, "unload", model, {"version": version, "refused": True})
        raise Conflict(
            f"{model} v{version} is still routed ({'; '.join(routed)}): every tenant's studies"
            f" would fail; move the routes away first (PUT /v1/models/{model}/routes,"
            f" DELETE /v1/models/{model}/shadows/{version}), then unload"
        )
    control = _control(services)
    try:
        loaded = control.unload(model, version)
    finally:
        control.close()
    _act(request, services, principal, "unload", model, {"version": version})
    return {"model": model, "loaded": sorted(loaded)}


def _known(services: ServicesDep, model: str, version: int | None = None) -> None:
    repo = load_repository(services.settings.model_repository)
    if model not in repo or (version and version not in repo[model].versions):
        raise NotFound(f"no model {model!r}" + (f" version {version}" if version else ""))


@router.get("/{model}/thresholds")
def get_thresholds(services: ServicesDep, principal: ModelReader, model: str) -> dict[str, Any]:
    """The confidence gate's stored thresholds for the model (orchestrator/triage/gate.py)."""
    _known(services, model)
    with translate_errors(), services.pool.connection() as conn:
        rows = gate.list_thresholds(conn, model)
    return {
        "model": model,
        "thresholds": [{**r, "updated_at": r["updated_at"].isoformat()} for r in rows],
    }


@router.put("/{model}/thresholds")
def put_thresholds(
    request: Request,
    services: ServicesDep,
    principal: MlEngineer,
    model: str,
    body: ThresholdsUpdate,
) -> dict[str, Any]:
    _known(services, model, body.version)
    t = gate.Thresholds(body.min_confidence, body.max_entropy, body.critical_probability)
    with translate_errors(), services.pool.connection() as conn:
        gate.set_thresholds(conn, model, body.version, t, actor=principal.name)
    _act(request, services, principal, "thresholds_set", model, body.model_dump())
    return get_thresholds(services, principal, model)
