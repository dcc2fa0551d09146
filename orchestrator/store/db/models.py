"""SQL for the model tables: ``model_versions`` (what the repository holds), ``model_routes``
(the traffic split and shadows), ``model_events`` (every route change, for rollback and
audit), ``model_gates`` (promotion thresholds) and ``gate_thresholds`` (the triage gate per
model version); and the per-version figures that promotion and drift are judged by (read
from ``results`` and ``review_cases``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# Actions that change the routes: what ``rollback`` undoes.
ROUTE_CHANGES = ("route", "promote", "failover")


@dataclass(frozen=True)
class Route:
    version: int
    weight: int
    shadow: bool


def routes_json(routes: list[Route]) -> list[dict[str, Any]]:
    return [asdict(r) for r in routes]


# model_versions


def register_version(conn: Connection, model: str, version: int) -> None:
    conn.execute(
        "INSERT INTO model_versions (model, version) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (model, version),
    )


def known_versions(conn: Connection, model: str) -> set[int]:
    """The model's versions that are not retired (empty: an unknown model)."""
    rows = conn.execute(
        "SELECT version FROM model_versions WHERE model = %s AND state <> 'retired'", (model,)
    ).fetchall()
    return {int(r[0]) for r in rows}


# model_routes


def has_routes(conn: Connection, model: str) -> bool:
    row = conn.execute("SELECT 1 FROM model_routes WHERE model = %s LIMIT 1", (model,)).fetchone()
    return row is not None


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


def insert_route(
    conn: Connection,
    model: str,
    route: Route,
    *,
    actor: str,
    if_absent: bool = False,
) -> None:
    """Add a route; with ``if_absent`` an existing route of that version is kept."""
    conn.execute(
        "INSERT INTO model_routes (model, version, weight, shadow, updated_by)"
        " VALUES (%s, %s, %s, %s, %s)" + (" ON CONFLICT DO NOTHING" if if_absent else ""),
        (model, route.version, route.weight, route.shadow, actor),
    )


def delete_routes(
    conn: Connection,
    model: str,
    *,
    version: int | None = None,
    shadow: bool | None = None,
) -> None:
    """Delete the model's routes: all, or those of ``version`` and/or of one kind."""
    where = "model = %s"
    params: list[Any] = [model]
    if version is not None:
        where += " AND version = %s"
        params.append(version)
    if shadow is not None:
        where += " AND shadow" if shadow else " AND NOT shadow"
    conn.execute(f"DELETE FROM model_routes WHERE {where}", params)


# model_events


def insert_event(
    conn: Connection,
    model: str,
    action: str,
    actor: str,
    before: list[Route],
    after: list[Route],
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO model_events (model, action, actor, before, after, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            model,
            action,
            actor,
            Jsonb(routes_json(before)),
            Jsonb(routes_json(after)),
            Jsonb(detail or {}),
        ),
    )


def amend_last_event(
    conn: Connection, model: str, *, before: list[Route], detail: dict[str, Any]
) -> None:
    """Rewrite the model's newest event's ``before`` and ``detail`` (a promotion records the
    routes before it, not those between its two steps)."""
    conn.execute(
        "UPDATE model_events SET before = %s, detail = %s WHERE id = (SELECT max(id) FROM"
        " model_events WHERE model = %s)",
        (Jsonb(routes_json(before)), Jsonb(detail), model),
    )


def routes_before_last_change(conn: Connection, model: str) -> list[Route] | None:
    """The routes in force before the model's newest route change; None when it has none."""
    row = conn.execute(
        "SELECT before FROM model_events WHERE model = %s AND action = ANY(%s)"
        " ORDER BY id DESC LIMIT 1",
        (model, list(ROUTE_CHANGES)),
    ).fetchone()
    if row is None:
        return None
    return [Route(**r) for r in (row[0] if isinstance(row[0], list) else json.loads(row[0]))]


# model_gates


def get_gate(conn: Connection, model: str) -> tuple[int, float, float] | None:
    """(min_results, min_agreement, max_review_share), or None for the defaults."""
    row = conn.execute(
        "SELECT min_results, min_agreement, max_review_share FROM model_gates WHERE model = %s",
        (model,),
    ).fetchone()
    return (int(row[0]), float(row[1]), float(row[2])) if row else None


def set_gate(
    conn: Connection, model: str, *, min_results: int, min_agreement: float, max_review_share: float
) -> None:
    conn.execute(
        "INSERT INTO model_gates (model, min_results, min_agreement, max_review_share)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (model) DO UPDATE SET"
        " min_results = EXCLUDED.min_results, min_agreement = EXCLUDED.min_agreement,"
        " max_review_share = EXCLUDED.max_review_share, updated_at = now()",
        (model, min_results, min_agreement, max_review_share),
    )


# Figures per version: results, agreement with the live arm and with review, confidence,
# review share, latency.

_COMPARE_SQL = """
WITH r AS (
    SELECT res.*, s.id AS sid
    FROM results res JOIN studies s ON s.id = res.study_id
    WHERE res.model = %(model)s AND res.version = ANY(%(versions)s)
),
live AS (
    SELECT instance_id, label FROM results WHERE model = %(model)s AND arm = 'live'
),
truth AS (
    SELECT rc.study_id,
           CASE WHEN rc.verdict = 'override' THEN rc.correct_label END AS override_label,
           rc.verdict
    FROM review_cases rc WHERE rc.status = 'closed'
)
SELECT r.version,
       CASE WHEN bool_or(r.arm = 'live') THEN 'live' ELSE 'shadow' END AS arm,
       count(*) AS results,
       count(DISTINCT r.sid) AS studies,
       avg((r.label = l.label)::int) FILTER (WHERE r.arm = 'shadow') AS agreement_with_live,
       avg((r.label = coalesce(t.override_label, l.label))::int)
           FILTER (WHERE t.verdict IS NOT NULL) AS agreement_with_review,
       count(*) FILTER (WHERE t.verdict IS NOT NULL) AS reviewed,
       avg(r.confidence) AS mean_confidence,
       percentile_cont(0.1) WITHIN GROUP (ORDER BY r.confidence) AS p10_confidence,
       (count(DISTINCT r.sid) FILTER (WHERE EXISTS (
            SELECT 1 FROM review_cases rc WHERE rc.study_id = r.sid)))::float
           / nullif(count(DISTINCT r.sid), 0) AS review_share,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY r.latency_ms) AS p50_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY r.latency_ms) AS p95_latency_ms
FROM r
LEFT JOIN live l ON l.instance_id = r.instance_id
LEFT JOIN truth t ON t.study_id = r.sid
GROUP BY r.version
ORDER BY r.version
"""


def version_figures(conn: Connection, model: str, versions: list[int]) -> dict[int, dict[str, Any]]:
    """Version → its figures (versions with no results are absent)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_COMPARE_SQL, {"model": model, "versions": versions}).fetchall()
    return {int(r["version"]): r for r in rows}


def live_confidences(conn: Connection[Any], model: str, version: int, window: int) -> list[float]:
    """The newest ``window`` live top-class confidences of one model version."""
    rows = conn.execute(
        "SELECT confidence FROM results WHERE model = %s AND version = %s AND arm = 'live'"
        " ORDER BY created_at DESC LIMIT %s",
        (model, version, window),
    ).fetchall()
    return [float(r[0]) for r in rows]


# Over the version's newest ``window`` results: studies, studies reviewed, verdicts, 'agree'
# verdicts, and agreement with the other arm on the same images.
_QUALITY_SQL = """
WITH recent AS (
    SELECT DISTINCT study_id FROM (
        SELECT study_id FROM results
        WHERE model = %(model)s AND version = %(version)s
        ORDER BY created_at DESC LIMIT %(window)s
    ) r
)
SELECT
    (SELECT count(*) FROM recent),
    (SELECT count(*) FROM recent JOIN review_cases c USING (study_id)),
    (SELECT count(*) FROM recent JOIN review_cases c USING (study_id) WHERE c.verdict IS NOT NULL),
    (SELECT count(*) FROM recent JOIN review_cases c USING (study_id) WHERE c.verdict = 'agree'),
    (SELECT count(*) FILTER (WHERE a.label = b.label)::float8 / NULLIF(count(*), 0)
       FROM results a JOIN results b
         ON a.instance_id = b.instance_id AND a.model = b.model AND a.version <> b.version
        AND a.arm <> b.arm
      WHERE a.model = %(model)s AND a.version = %(version)s
        AND a.study_id IN (SELECT study_id FROM recent))
"""


def quality_counts(
    conn: Connection[Any], model: str, version: int, window: int
) -> tuple[int, int, int, int, float | None]:
    row = conn.execute(
        _QUALITY_SQL, {"model": model, "version": version, "window": window}
    ).fetchone()
    assert row is not None
    studies, reviewed, verdicts, agreed, arm_agreement = row
    return int(studies), int(reviewed), int(verdicts), int(agreed), arm_agreement


# gate_thresholds


def threshold_rows(
    conn: Connection, models: list[str]
) -> list[tuple[str, int, float, float, float]]:
    """(model, version, min_confidence, max_entropy, critical_probability) of ``models``."""
    return [
        (str(m), int(v), float(c), float(e), float(p))
        for m, v, c, e, p in conn.execute(
            "SELECT model, version, min_confidence, max_entropy, critical_probability"
            " FROM gate_thresholds WHERE model = ANY(%s)",
            (models,),
        ).fetchall()
    ]


def list_thresholds(conn: Connection, model: str) -> list[dict[str, Any]]:
    """The model's stored rows (version 0 = every version without its own row)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT model, version, min_confidence, max_entropy, critical_probability,"
            " updated_by, updated_at FROM gate_thresholds WHERE model = %s ORDER BY version",
            (model,),
        ).fetchall()


def set_thresholds(
    conn: Connection,
    model: str,
    version: int,
    *,
    min_confidence: float,
    max_entropy: float,
    critical_probability: float,
    actor: str | None,
) -> None:
    conn.execute(
        "INSERT INTO gate_thresholds (model, version, min_confidence, max_entropy,"
        " critical_probability, updated_by) VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (model, version) DO UPDATE SET min_confidence = EXCLUDED.min_confidence,"
        " max_entropy = EXCLUDED.max_entropy,"
        " critical_probability = EXCLUDED.critical_probability,"
        " updated_by = EXCLUDED.updated_by, updated_at = now()",
        (model, version, min_confidence, max_entropy, critical_probability, actor),
    )


def routed_versions(conn: Connection) -> list[tuple[str, int, bool]]:
    """(model, version, shadow) of every version a live route or a shadow points to."""
    return [
        (str(m), int(v), bool(s))
        for m, v, s in conn.execute(
            "SELECT model, version, shadow FROM model_routes WHERE shadow OR weight > 0"
            " ORDER BY model, version"
        ).fetchall()
    ]
