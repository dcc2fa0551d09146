"""Which model version serves a study: sticky weighted split between live arms, plus shadows.

The arm is a pure function of the StudyInstanceUID and the current weights, so every image
of a study meets the same version and a re-sent study lands in the same arm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg import Connection

# Hash space for the split: weights are integer percentages.
_BUCKETS = 100


@dataclass(frozen=True)
class Route:
    version: int
    weight: int
    shadow: bool


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
            conn.execute(
                "INSERT INTO model_versions (model, version) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (model, version),
            )
        has_routes = conn.execute(
            "SELECT 1 FROM model_routes WHERE model = %s LIMIT 1", (model,)
        ).fetchone()
        if not has_routes and versions:
            conn.execute(
                "INSERT INTO model_routes (model, version, weight, updated_by)"
                " VALUES (%s, %s, 100, 'default') ON CONFLICT DO NOTHING",
                (model, max(versions)),
            )


def load_routes(conn: Connection, model: str) -> list[Route]:
    rows = conn.execute(
        "SELECT version, weight, shadow FROM model_routes WHERE model = %s ORDER BY version",
        (model,),
    ).fetchall()
    return [Route(version=int(v), weight=int(w), shadow=bool(s)) for v, w, s in rows]


def load_all_routes(conn: Connection) -> dict[str, list[Route]]:
    """Every model's routes in one query (a worker reads them once per study)."""
    out: dict[str, list[Route]] = {}
    for model, v, w, s in conn.execute(
        "SELECT model, version, weight, shadow FROM model_routes ORDER BY model, version"
    ).fetchall():
        out.setdefault(str(model), []).append(Route(version=int(v), weight=int(w), shadow=bool(s)))
    return out
