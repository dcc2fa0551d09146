"""Which model version serves a study: sticky weighted split between live arms, plus shadows.

The arm is a pure function of the StudyInstanceUID and the current weights, so every image
of a study meets the same version and a re-sent study lands in the same arm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg import Connection

from orchestrator.store.db import models as db
from orchestrator.store.db.models import Route, load_all_routes, load_routes

__all__ = ["Choice", "Route", "bucket", "choose", "load_all_routes", "load_routes", "sync_versions"]

# Hash space for the split: weights are integer percentages.
_BUCKETS = 100


@dataclass(frozen=True)
class Choice:
    live: int
    shadows: tuple[int, ...]


def bucket(model: str, study_uid: str) -> int:
    digest = hashlib.sha256(f"{model}\x00{study_uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


def choose(model: str, study_uid: str, routes: list[Route]) -> Choice:
    live = sorted((r for r in routes if not r.shadow and r.weight > 0), key=lambda r: r.version)
    if not live:
        raise LookupError(f"model {model!r} has no live route")
    b = bucket(model, study_uid)
    total = sum(r.weight for r in live)
    point = b * total // _BUCKETS
    acc = 0
    chosen = live[-1].version
    for r in live:
        acc += r.weight
        if point < acc:
            chosen = r.version
            break
    shadows = tuple(sorted(r.version for r in routes if r.shadow and r.version != chosen))
    return Choice(live=chosen, shadows=shadows)


def sync_versions(conn: Connection, available: dict[str, tuple[int, ...]]) -> None:
    """Register the repository's versions; give a model with no routes 100 % on its newest."""
    for model, versions in available.items():
        for version in versions:
            db.register_version(conn, model, version)
        if versions and not db.has_routes(conn, model):
            db.insert_route(
                conn, model, Route(max(versions), 100, False), actor="default", if_absent=True
            )
