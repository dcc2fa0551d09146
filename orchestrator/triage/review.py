"""The clinicians' review loop: the queue, claims, verdicts and the figures they yield.

A case moves ``open → claimed → closed`` (or back to ``open`` on release) only by
conditional updates, so two reviewers never work one case and a closed case never changes.
Verdicts are ground truth: ``stats`` scores every model version against them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orchestrator import lifecycle, metrics
from orchestrator.errors import BadRequest, MedtriageError, NotFound
from orchestrator.store.db.keys import Principal
from orchestrator.triage.gate import NORMAL_LABELS, Decision

VERDICTS = ("agree", "override")
# Longest free-text note a reviewer may leave.
MAX_NOTE_CHARS = 4000
# Page bound for the queue.
MAX_QUEUE_PAGE = 200


class ReviewConflict(MedtriageError):
    """The case is not in a state that allows this (claimed by someone else, closed)."""

    http_status = 409


class CaseNotFound(NotFound):
    def __init__(self, case_id: UUID) -> None:
        super().__init__(f"review case {case_id} not found")
        self.case_id = case_id


class InvalidVerdict(BadRequest):
    http_status = 422


def open_case(conn: Connection, study: dict[str, Any], decision: Decision) -> None:
    """Open (once per study) the review case the gate asked for."""
    conn.execute(
        "INSERT INTO review_cases (tenant_id, study_id, reasons, urgency, details)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (study_id) DO NOTHING",
        (
            study["tenant_id"],
            study["id"],
            decision.reasons,
            decision.urgency,
            Jsonb(decision.details),
        ),
    )


_CASE_COLUMNS = (
    "rc.id, rc.study_id, rc.reasons, rc.urgency, rc.status, rc.claimed_by, rc.claimed_by_name,"
    " rc.claimed_at, rc.verdict, rc.correct_label, rc.note, rc.verdict_by_name, rc.closed_at,"
    " rc.created_at, rc.details, s.priority, s.study_uid"
)


def queue(
    conn: Connection,
    tenant_id: UUID,
    *,
    statuses: tuple[str, ...] = ("open", "claimed"),
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Cases of a tenant, most urgent first (critical findings, then STAT), then oldest."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {_CASE_COLUMNS} FROM review_cases rc JOIN studies s ON s.id = rc.study_id"
            " WHERE rc.tenant_id = %s AND rc.status = ANY(%s)"
            " ORDER BY rc.urgency DESC, rc.created_at, rc.id LIMIT %s",
            (tenant_id, list(statuses), min(limit, MAX_QUEUE_PAGE)),
        ).fetchall()


def get_case(conn: Connection, tenant_id: UUID, case_id: UUID) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_CASE_COLUMNS} FROM review_cases rc JOIN studies s ON s.id = rc.study_id"
            " WHERE rc.id = %s AND rc.tenant_id = %s",
            (case_id, tenant_id),
        ).fetchone()
    if row is None:
        raise CaseNotFound(case_id)
    return row


def case_results(conn: Connection, study_id: UUID) -> list[dict[str, Any]]:
    """Every result of the case's study (live and shadow) with its instance's preview state."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT r.instance_id, r.model, r.version, r.arm, r.label, r.confidence, r.findings,"
            " r.outputs, i.preview_key IS NOT NULL AS has_preview, i.warnings"
            " FROM results r JOIN instances i ON i.id = r.instance_id"
            " WHERE r.study_id = %s ORDER BY i.created_at, r.model, r.arm, r.version",
            (study_id,),
        ).fetchall()


def _explain(conn: Connection, tenant_id: UUID, case_id: UUID, principal: Principal) -> str:
    case = get_case(conn, tenant_id, case_id)
    if case["status"] == "closed":
        return f"review case {case_id} is already closed (verdict {case['verdict']!r})"
    if case["status"] == "open":
        return f"review case {case_id} is not claimed: claim it first"
    if case["claimed_by"] != principal.key_id:
        return f"review case {case_id} is claimed by another reviewer"
    return f"review case {case_id} changed meanwhile; reload it"


def claim(conn: Connection, tenant_id: UUID, case_id: UUID, principal: Principal) -> dict[str, Any]:
    row = conn.execute(
        "UPDATE review_cases SET status = 'claimed', claimed_by = %s, claimed_by_name = %s,"
        " claimed_at = now() WHERE id = %s AND tenant_id = %s AND status = 'open' RETURNING id",
        (principal.key_id, principal.name, case_id, tenant_id),
    ).fetchone()
    if row is None:
        raise ReviewConflict(_explain(conn, tenant_id, case_id, principal))
    return get_case(conn, tenant_id, case_id)


def release(
    conn: Connection, tenant_id: UUID, case_id: UUID, principal: Principal
) -> dict[str, Any]:
    row = conn.execute(
        "UPDATE review_cases SET status = 'open', claimed_by = NULL, claimed_by_name = NULL,"
        " claimed_at = NULL WHERE id = %s AND tenant_id = %s AND status = 'claimed'"
        " AND claimed_by = %s RETURNING id",
        (case_id, tenant_id, principal.key_id),
    ).fetchone()
    if row is None:
        raise ReviewConflict(_explain(conn, tenant_id, case_id, principal))
    return get_case(conn, tenant_id, case_id)


def record_verdict(
    conn: Connection,
    tenant_id: UUID,
    case_id: UUID,
    principal: Principal,
    *,
    verdict: str,
    correct_label: str | None,
    note: str | None,
    labels: tuple[str, ...],
) -> dict[str, Any]:
    """Close a case the caller holds with ``agree`` or ``override`` + a label of the model.

    Every check runs before the single conditional update, so bad input changes nothing.
    """
    if verdict not in VERDICTS:
        raise InvalidVerdict(f"verdict must be one of {list(VERDICTS)}, not {verdict!r}")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidVerdict(f"note is longer than {MAX_NOTE_CHARS} characters")
    case = get_case(conn, tenant_id, case_id)
    if case["status"] == "closed":
        # A closed case never changes; say so before judging the new verdict's label.
        raise ReviewConflict(_explain(conn, tenant_id, case_id, principal))
    if verdict == "override":
        if correct_label not in labels:
            raise InvalidVerdict(
                f"override needs correct_label, one of the model's labels {list(labels)};"
                f" got {correct_label!r}"
            )
        live = {r["label"] for r in case_results(conn, case["study_id"]) if r["arm"] == "live"}
        if live == {correct_label}:
            raise InvalidVerdict(
                f"the model already said {correct_label!r}: send verdict 'agree' instead"
            )
    elif correct_label is not None:
        raise InvalidVerdict("correct_label is only for verdict 'override'")
    row = conn.execute(
        "UPDATE review_cases SET status = 'closed', verdict = %s, correct_label = %s, note = %s,"
        " verdict_by = %s, verdict_by_name = %s, closed_at = now()"
        " WHERE id = %s AND tenant_id = %s AND status = 'claimed' AND claimed_by = %s"
        " RETURNING study_id",
        (
            verdict,
            correct_label,
            note,
            principal.key_id,
            principal.name,
            case_id,
            tenant_id,
            principal.key_id,
        ),
    ).fetchone()
    if row is None:
        raise ReviewConflict(_explain(conn, tenant_id, case_id, principal))
    # A reviewed study is finished.
    lifecycle.mark_reviewed(conn, row[0])
    return get_case(conn, tenant_id, case_id)


@dataclass(frozen=True)
class VersionAccuracy:
    model: str
    version: int
    arms: str
    reviewed: int
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None


_STATS_SQL = """
WITH truth AS (
    SELECT study_id, verdict, correct_label FROM review_cases
    WHERE status = 'closed' AND verdict IS NOT NULL
      AND (%(tenant)s::uuid IS NULL OR tenant_id = %(tenant)s::uuid)
),
ref AS (
    SELECT instance_id, label FROM results
    WHERE model = %(truth_model)s AND arm = 'live' AND study_id IN (SELECT study_id FROM truth)
),
scored AS (
    SELECT r.version, r.arm, r.label AS predicted,
           CASE WHEN t.verdict = 'override' THEN t.correct_label ELSE ref.label END AS actual
    FROM results r
    JOIN truth t ON t.study_id = r.study_id
    LEFT JOIN ref ON ref.instance_id = r.instance_id
    WHERE r.model = %(model)s
)
SELECT version,
       string_agg(DISTINCT arm, ',') AS arms,
       count(*) AS n,
       count(*) FILTER (WHERE predicted = actual) AS correct,
       count(*) FILTER (WHERE predicted <> ALL(%(normal)s) AND actual <> ALL(%(normal)s)) AS tp,
       count(*) FILTER (WHERE predicted = ANY(%(normal)s) AND actual <> ALL(%(normal)s)) AS fn,
       count(*) FILTER (WHERE predicted = ANY(%(normal)s) AND actual = ANY(%(normal)s)) AS tn,
       count(*) FILTER (WHERE predicted <> ALL(%(normal)s) AND actual = ANY(%(normal)s)) AS fp
FROM scored WHERE actual IS NOT NULL
GROUP BY version ORDER BY version
"""


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def stats(
    conn: Connection,
    model: str,
    *,
    tenant_id: UUID | None = None,
    truth_model: str = "triage",
) -> list[VersionAccuracy]:
    """Live accuracy, sensitivity and specificity per version of ``model`` on reviewed cases.

    Truth per instance: the override label, or (agree) the live ``truth_model`` label the
    reviewer agreed with. Positive = any label other than normal.
    """
    params = {
        "tenant": tenant_id,
        "model": model,
        "truth_model": truth_model,
        "normal": list(NORMAL_LABELS),
    }
    out = []
    for r in conn.execute(_STATS_SQL, params).fetchall():
        version, arms, n, correct, tp, fn, tn, fp = r
        out.append(
            VersionAccuracy(
                model=model,
                version=int(version),
                arms=str(arms),
                reviewed=int(n),
                accuracy=_ratio(int(correct), int(n)),
                sensitivity=_ratio(int(tp), int(tp) + int(fn)),
                specificity=_ratio(int(tn), int(tn) + int(fp)),
            )
        )
    return out


def stats_dicts(conn: Connection, model: str, **kw: Any) -> list[dict[str, Any]]:
    return [asdict(s) for s in stats(conn, model, **kw)]


# The figures `models compare` shows beside rollout's, per version.
FIGURES = ("accuracy", "sensitivity", "specificity")


def figures_by_version(
    conn: Connection, model: str, *, tenant_id: UUID | None = None
) -> dict[int, dict[str, float | None]]:
    """``{version: {accuracy, sensitivity, specificity}}`` from every reviewed case."""
    return {
        s.version: {f: getattr(s, f) for f in FIGURES}
        for s in stats(conn, model, tenant_id=tenant_id)
    }


def publish_figures(conn: Connection) -> None:
    """Refresh the reviewed-performance gauges of every model with reviewed results."""
    models = [r[0] for r in conn.execute("SELECT DISTINCT model FROM results ORDER BY 1")]
    for model in models:
        for s in stats(conn, model):
            for figure in FIGURES:
                value = getattr(s, figure)
                if value is not None:
                    metrics.REVIEWED_PERFORMANCE.labels(model, str(s.version), figure).set(value)
