"""Model rollout: versions, traffic weights, shadows, comparison, gated promotion, rollback.

State lives in PostgreSQL (``model_routes``, ``model_events``, ``model_gates``) and is read
by workers per study, so every change takes effect without restarts. Triton's explicit
model control loads and unloads versions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from psycopg import Connection

from orchestrator.errors import BadRequest, MedtriageError, NotFound
from orchestrator.inference.routing import Route, load_routes
from orchestrator.store.db import models as db


class RolloutError(BadRequest):
    """A rollout request that cannot be honoured as asked (weights, versions, gate)."""


class GateFailed(MedtriageError):
    http_status = 409


@dataclass(frozen=True)
class VersionStats:
    version: int
    arm: str
    results: int
    studies: int
    agreement_with_live: float | None
    agreement_with_review: float | None
    reviewed: int
    mean_confidence: float | None
    p10_confidence: float | None
    review_share: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None


@dataclass(frozen=True)
class Gate:
    min_results: int = 50
    min_agreement: float = 0.9
    max_review_share: float = 0.5


def _event(
    conn: Connection,
    model: str,
    action: str,
    actor: str,
    before: list[Route],
    after: list[Route],
    detail: dict[str, Any] | None = None,
) -> None:
    db.insert_event(conn, model, action, actor, before, after, detail)


def _known_versions(conn: Connection, model: str) -> set[int]:
    known = db.known_versions(conn, model)
    if not known:
        raise NotFound(f"unknown model {model!r}")
    return known


def parse_weights(pairs: list[str]) -> dict[int, int]:
    """``["1=90", "2=10"]`` → ``{1: 90, 2: 10}``."""
    weights: dict[int, int] = {}
    for pair in pairs:
        try:
            version, weight = pair.split("=", 1)
            weights[int(version)] = int(weight)
        except ValueError as exc:
            raise RolloutError(
                f"weight {pair!r} must look like VERSION=PERCENT, e.g. 2=10"
            ) from exc
    return weights


def set_weights(
    conn: Connection,
    model: str,
    weights: dict[int, int],
    *,
    actor: str,
    loaded: set[int] | None = None,
    action: str = "route",
) -> list[Route]:
    """Replace the live split. Weights must sum to 100 and name known (and loaded) versions."""
    known = _known_versions(conn, model)
    if any(w < 0 or w > 100 for w in weights.values()):
        raise RolloutError("each weight must be between 0 and 100")
    if sum(weights.values()) != 100:
        raise RolloutError(f"weights must sum to 100, not {sum(weights.values())}")
    unknown = sorted(set(weights) - known)
    if unknown:
        raise RolloutError(f"{model} has no version(s) {unknown}; known: {sorted(known)}")
    if loaded is not None:
        missing = sorted(v for v, w in weights.items() if w > 0 and v not in loaded)
        if missing:
            raise RolloutError(
                f"{model} version(s) {missing} are not loaded in Triton; "
                f"`medtriage models load {model} {missing[0]}` first"
            )
    before = load_routes(conn, model)
    shadows = {r.version for r in before if r.shadow}
    db.delete_routes(conn, model, shadow=False)
    for version, weight in sorted(weights.items()):
        if weight == 0:
            continue
        if version in shadows:  # a version cannot be live and shadow at once
            db.delete_routes(conn, model, version=version)
        db.insert_route(conn, model, Route(version, weight, False), actor=actor)
    after = load_routes(conn, model)
    _event(conn, model, action, actor, before, after)
    return after


def add_shadow(conn: Connection, model: str, version: int, *, actor: str) -> list[Route]:
    if version not in _known_versions(conn, model):
        raise RolloutError(f"{model} has no version {version}")
    before = load_routes(conn, model)
    if any(r.version == version and not r.shadow for r in before):
        raise RolloutError(f"{model} v{version} is live; a live version cannot also be a shadow")
    db.insert_route(conn, model, Route(version, 0, True), actor=actor, if_absent=True)
    after = load_routes(conn, model)
    _event(conn, model, "shadow_add", actor, before, after, {"version": version})
    return after


def remove_shadow(conn: Connection, model: str, version: int, *, actor: str) -> list[Route]:
    before = load_routes(conn, model)
    db.delete_routes(conn, model, version=version, shadow=True)
    after = load_routes(conn, model)
    _event(conn, model, "shadow_remove", actor, before, after, {"version": version})
    return after


def routed_to(model: str, version: int, routes: list[Route]) -> list[str]:
    """The routes that send studies to ``version`` (a live arm with weight, or a shadow),
    named for an operator; unloading such a version is refused."""
    return [
        f"shadow route {model} v{r.version}"
        if r.shadow
        else f"live route {model} v{r.version} ({r.weight} %)"
        for r in routes
        if r.version == version and (r.shadow or r.weight > 0)
    ]


def failover(conn: Connection, model: str, lost: int, *, actor: str, reason: str) -> list[Route]:
    """A live version disappeared: give its share to the remaining live arms, record it."""
    before = load_routes(conn, model)
    live = {r.version: r.weight for r in before if not r.shadow and r.version != lost}
    if not live:
        return before
    total = sum(live.values())
    weights = {v: w * 100 // total for v, w in live.items()}
    top = max(weights, key=lambda v: weights[v])
    weights[top] += 100 - sum(weights.values())
    return set_weights(conn, model, weights, actor=actor, action="failover") if weights else before


def get_gate(conn: Connection, model: str) -> Gate:
    row = db.get_gate(conn, model)
    return Gate(*row) if row else Gate()


def set_gate(conn: Connection, model: str, gate: Gate) -> None:
    db.set_gate(
        conn,
        model,
        min_results=gate.min_results,
        min_agreement=gate.min_agreement,
        max_review_share=gate.max_review_share,
    )


def compare(conn: Connection, model: str, versions: list[int]) -> list[VersionStats]:
    found = db.version_figures(conn, model, versions)
    out = []
    for v in versions:
        r = found.get(v)
        if r is None:
            out.append(VersionStats(v, "-", 0, 0, None, None, 0, None, None, None, None, None))
            continue
        out.append(
            VersionStats(
                version=v,
                arm=r["arm"],
                results=int(r["results"]),
                studies=int(r["studies"]),
                agreement_with_live=_f(r["agreement_with_live"]),
                agreement_with_review=_f(r["agreement_with_review"]),
                reviewed=int(r["reviewed"]),
                mean_confidence=_f(r["mean_confidence"]),
                p10_confidence=_f(r["p10_confidence"]),
                review_share=_f(r["review_share"]),
                p50_latency_ms=_f(r["p50_latency_ms"]),
                p95_latency_ms=_f(r["p95_latency_ms"]),
            )
        )
    return out


def _f(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def gate_failures(stats: VersionStats, gate: Gate) -> list[str]:
    failures = []
    if stats.results < gate.min_results:
        failures.append(f"only {stats.results} results (gate needs {gate.min_results})")
    if stats.agreement_with_live is None:
        failures.append("no shadow results to measure agreement with the live arm")
    elif stats.agreement_with_live < gate.min_agreement:
        failures.append(
            f"agreement with live {stats.agreement_with_live:.3f} < {gate.min_agreement}"
        )
    if stats.review_share is not None and stats.review_share > gate.max_review_share:
        failures.append(f"review share {stats.review_share:.3f} > {gate.max_review_share}")
    return failures


def promote(
    conn: Connection,
    model: str,
    version: int,
    *,
    actor: str,
    force: bool = False,
    loaded: set[int] | None = None,
) -> list[Route]:
    """Send 100 % of traffic to ``version`` if the model's gate passes (or ``force``)."""
    gate = get_gate(conn, model)
    stats = compare(conn, model, [version])[0]
    failures = gate_failures(stats, gate)
    if failures and not force:
        _event(
            conn,
            model,
            "promote_refused",
            actor,
            load_routes(conn, model),
            load_routes(conn, model),
            {"version": version, "failures": failures},
        )
        # The refusal is part of the record: keep it even though the caller's transaction
        # is rolled back by the error.
        conn.commit()
        raise GateFailed(
            f"promotion of {model} v{version} refused: "
            + "; ".join(failures)
            + " (use --force to override)"
        )
    before = load_routes(conn, model)
    db.delete_routes(conn, model, version=version, shadow=True)
    after = set_weights(conn, model, {version: 100}, actor=actor, loaded=loaded, action="promote")
    db.amend_last_event(
        conn,
        model,
        before=before,
        detail={
            "version": version,
            "forced": bool(failures),
            "gate_failures": failures,
            "stats": asdict(stats),
        },
    )
    return after


def rollback(conn: Connection, model: str, *, actor: str) -> list[Route]:
    """Restore the routes that were in force before the last route change."""
    previous = db.routes_before_last_change(conn, model)
    if previous is None:
        raise RolloutError(f"{model} has no route change to roll back")
    before = load_routes(conn, model)
    db.delete_routes(conn, model)
    for r in previous:
        db.insert_route(conn, model, r, actor=actor)
    after = load_routes(conn, model)
    _event(conn, model, "rollback", actor, before, after)
    return after
