"""The confidence gate against a real PostgreSQL: each reason code, per-version thresholds,
urgency. Results rows are written as the worker writes them; no Triton is needed here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orchestrator.store.db import studies as db
from orchestrator.triage import gate

pytestmark = pytest.mark.integration

PROBS = "probs"  # the triage/analysis class-probability output (model_repository configs)
DEFAULT_CONFIDENCE = 0.75


@pytest.fixture()
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url) as c:
        yield c
        c.rollback()  # nothing a test writes here outlives it


def _study(conn: psycopg.Connection, priority: str = "routine") -> dict[str, Any]:
    tenant = conn.execute(
        "INSERT INTO tenants (name) VALUES (%s) RETURNING id", (f"gate-{uuid.uuid4().hex[:8]}",)
    ).fetchone()[0]
    with conn.cursor(row_factory=dict_row) as cur:
        study = cur.execute(
            "INSERT INTO studies (tenant_id, study_uid, status, priority)"
            " VALUES (%s, %s, 'processing', %s) RETURNING id, tenant_id, priority",
            (tenant, f"1.2.3.{uuid.uuid4().int % 10**12}", priority),
        ).fetchone()
    series = conn.execute(
        "INSERT INTO series (study_id, series_uid, modality) VALUES (%s, '1.2.3.9', 'CR')"
        " RETURNING id",
        (study["id"],),
    ).fetchone()[0]
    study["series_id"] = series
    return study


def _instance(conn: psycopg.Connection, study: dict[str, Any]) -> uuid.UUID:
    return conn.execute(
        "INSERT INTO instances (study_id, series_id, sop_uid, sop_class_uid, object_key,"
        " size_bytes, sha256) VALUES (%s, %s, %s, '1.2.840.10008.5.1.4.1.1.1', 'k', 1, 'x')"
        " RETURNING id",
        (study["id"], study["series_id"], f"1.2.3.{uuid.uuid4().int % 10**12}"),
    ).fetchone()[0]


def _result(
    conn: psycopg.Connection,
    study: dict[str, Any],
    instance: uuid.UUID,
    *,
    model: str = "triage",
    version: int = 1,
    arm: str = "live",
    probs: tuple[float, float],
    findings: list[dict[str, Any]] | None = None,
) -> None:
    labels = ("normal", "pneumonia")
    top = max(range(2), key=lambda i: probs[i])
    conn.execute(
        "INSERT INTO results (study_id, instance_id, model, version, arm, label, confidence,"
        " outputs, findings, latency_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 1.0)",
        (
            study["id"],
            instance,
            model,
            version,
            arm,
            labels[top],
            probs[top],
            Jsonb({PROBS: list(probs)}),
            Jsonb(findings or []),
        ),
    )


def _evaluate(
    conn: psycopg.Connection,
    study: dict[str, Any],
    *,
    failed: dict[uuid.UUID, str] | None = None,
    warnings: dict[uuid.UUID, tuple[str, ...]] | None = None,
) -> gate.Decision:
    return gate.evaluate(
        conn,
        study,
        db.results(conn, study["id"], include_shadow=True),
        failed=failed or {},
        warnings=warnings or {},
        prob_outputs={"triage": PROBS, "analysis": PROBS},
        default_confidence=DEFAULT_CONFIDENCE,
    )


def test_confident_study_passes(conn: psycopg.Connection) -> None:
    study = _study(conn)
    inst = _instance(conn, study)
    _result(conn, study, inst, probs=(0.97, 0.03))
    _result(conn, study, inst, model="analysis", probs=(0.95, 0.05))
    decision = _evaluate(conn, study)
    assert decision.reasons == [] and decision.urgency == 0


def test_low_confidence_and_high_entropy(conn: psycopg.Connection) -> None:
    study = _study(conn)
    inst = _instance(conn, study)
    _result(conn, study, inst, probs=(0.55, 0.45))  # entropy 0.688 nats > 0.6
    decision = _evaluate(conn, study)
    assert decision.reasons == [gate.LOW_CONFIDENCE, gate.HIGH_ENTROPY]
    assert decision.details[gate.LOW_CONFIDENCE][0]["value"] == pytest.approx(0.55)
    assert decision.details[gate.HIGH_ENTROPY][0]["value"] == pytest.approx(0.6881, abs=1e-4)
    study2 = _study(conn)
    inst2 = _instance(conn, study2)
    _result(conn, study2, inst2, probs=(0.2, 0.8))  # 0.8 >= 0.75, entropy 0.500 <= 0.6
    assert _evaluate(conn, study2).reasons == []


def test_per_version_thresholds_override_the_default(conn: psycopg.Connection) -> None:
    study = _study(conn)
    inst = _instance(conn, study)
    _result(conn, study, inst, version=2, probs=(0.2, 0.8))
    assert _evaluate(conn, study).reasons == []
    # Model-wide (version 0) row first, then a version-2 row that wins over it.
    gate.set_thresholds(conn, "triage", 0, gate.Thresholds(0.5, 2.0, 0.99))
    assert gate.thresholds(conn, "triage", 2, DEFAULT_CONFIDENCE).min_confidence == 0.5
    gate.set_thresholds(conn, "triage", 2, gate.Thresholds(0.85, 2.0, 0.99), actor="test")
    assert gate.thresholds(conn, "triage", 1, DEFAULT_CONFIDENCE).min_confidence == 0.5
    decision = _evaluate(conn, study)
    assert decision.reasons == [gate.LOW_CONFIDENCE]
    assert decision.details[gate.LOW_CONFIDENCE][0]["version"] == 2


def test_shadow_disagreement(conn: psycopg.Connection) -> None:
    study = _study(conn)
    inst = _instance(conn, study)
    _result(conn, study, inst, version=1, probs=(0.9, 0.1))
    _result(conn, study, inst, version=2, arm="shadow", probs=(0.1, 0.9))
    decision = _evaluate(conn, study)
    assert decision.reasons == [gate.SHADOW_DISAGREEMENT]
    detail = decision.details[gate.SHADOW_DISAGREEMENT][0]
    assert (detail["live_label"], detail["shadow_label"], detail["version"]) == (
        "normal",
        "pneumonia",
        2,
    )


def test_preprocessing_warnings_and_failed_instances(conn: psycopg.Connection) -> None:
    study = _study(conn)
    inst = _instance(conn, study)
    other = _instance(conn, study)
    _result(conn, study, inst, probs=(0.95, 0.05))
    decision = _evaluate(
        conn,
        study,
        warnings={inst: ("lossy_source", "unusual_photometric:ybr_full", "frames_dropped:9")},
        failed={other: "decode: broken"},
    )
    assert decision.reasons == [
        gate.LOSSY_SOURCE,
        gate.UNUSUAL_PHOTOMETRIC,
        gate.FRAMES_DROPPED,
        gate.INSTANCE_FAILED,
    ]
    # Warnings that are not reasons (e.g. MONOCHROME1 inverted) send nothing to review.
    assert _evaluate(conn, study, warnings={inst: ("monochrome1_inverted",)}).reasons == []


def test_critical_finding_and_stat_set_urgency(conn: psycopg.Connection) -> None:
    study = _study(conn, priority="stat")
    inst = _instance(conn, study)
    _result(conn, study, inst, probs=(0.04, 0.96))
    _result(
        conn,
        study,
        inst,
        model="analysis",
        probs=(0.05, 0.95),
        findings=[{"code": "pneumonia", "probability": 0.95}],
    )
    decision = _evaluate(conn, study)
    assert decision.reasons == [gate.CRITICAL_FINDING]
    assert decision.urgency == gate.URGENCY_CRITICAL + gate.URGENCY_STAT
    # Below the critical probability a finding is not urgent; STAT alone adds 1.
    study2 = _study(conn, priority="stat")
    inst2 = _instance(conn, study2)
    _result(conn, study2, inst2, probs=(0.3, 0.55))
    _result(
        conn,
        study2,
        inst2,
        model="analysis",
        probs=(0.4, 0.6),
        findings=[{"code": "pneumonia", "probability": 0.6}],
    )
    decision2 = _evaluate(conn, study2)
    assert gate.CRITICAL_FINDING not in decision2.reasons
    assert gate.LOW_CONFIDENCE in decision2.reasons
    assert decision2.urgency == gate.URGENCY_STAT
