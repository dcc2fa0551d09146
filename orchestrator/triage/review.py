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

from orchestrator import lifecycle, metrics
from orchestrator.errors import BadRequest, MedtriageError, NotFound
from orchestrator.store.db import review_cases as db
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
    db.insert_case(
        conn,
        tenant_id=study["tenant_id"],
        study_id=study["id"],
        reasons=decision.reasons,
        urgency=decision.urgency,
        details=decision.details,
    )


def queue(
    conn: Connection,
    tenant_id: UUID,
    *,
    statuses: tuple[str, ...] = ("open", "claimed"),
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Cases of a tenant, most urgent first (critical findings, then STAT), then oldest."""
    return db.cases(conn, tenant_id, statuses=list(statuses), limit=min(limit, MAX_QUEUE_PAGE))


def get_case(conn: Connection, tenant_id: UUID, case_id: UUID) -> dict[str, Any]:
    row = db.case(conn, tenant_id, case_id)
    if row is None:
        raise CaseNotFound(case_id)
    return row


# The case view shows the study's results beside the case.
case_results = db.case_results


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
    if not db.claim(conn, tenant_id, case_id, by=principal.key_id, by_name=principal.name):
        raise ReviewConflict(_explain(conn, tenant_id, case_id, principal))
    return get_case(conn, tenant_id, case_id)


def release(
    conn: Connection, tenant_id: UUID, case_id: UUID, principal: Principal
) -> dict[str, Any]:
    if not db.release(conn, tenant_id, case_id, by=principal.key_id):
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
    study_id = db.close(
        conn,
        tenant_id,
        case_id,
        by=principal.key_id,
        by_name=principal.name,
        verdict=verdict,
        correct_label=correct_label,
        note=note,
    )
    if study_id is None:
        raise ReviewConflict(_explain(conn, tenant_id, case_id, principal))
    # A reviewed study is finished.
    lifecycle.mark_reviewed(conn, study_id)
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
    out = []
    for version, arms, n, correct, tp, fn, tn, fp in db.accuracy_counts(
        conn,
        model=model,
        truth_model=truth_model,
        normal=list(NORMAL_LABELS),
        tenant_id=tenant_id,
    ):
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
    for model in db.models_with_results(conn):
        for s in stats(conn, model):
            for figure in FIGURES:
                value = getattr(s, figure)
                if value is not None:
                    metrics.REVIEWED_PERFORMANCE.labels(model, str(s.version), figure).set(value)
