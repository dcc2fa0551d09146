"""Drift math (PSI, Jensen-Shannon), the committed references, and the drift/quality gauges
the API exports from a real PostgreSQL database filled with known confidences."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.api.app import create_app
from orchestrator.inference import drift
from orchestrator.inference.specs import load_repository
from orchestrator.settings import REPO_ROOT, ApiSettings

REPOSITORY = REPO_ROOT / "model_repository"
BINS = tuple(0.5 + 0.025 * i for i in range(21))


def test_identical_distributions_do_not_drift() -> None:
    counts = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)
    assert drift.psi(counts, counts) == pytest.approx(0.0, abs=1e-12)
    assert drift.js_distance(counts, counts) == pytest.approx(0.0, abs=1e-7)
    # Scale does not matter: shares are compared, not counts.
    assert drift.psi(counts, tuple(3 * c for c in counts)) == pytest.approx(0.0, abs=1e-12)


def test_disjoint_distributions_are_maximally_distant() -> None:
    low = (10,) + (0,) * 19
    high = (0,) * 19 + (10,)
    assert drift.js_distance(low, high) == pytest.approx(1.0)
    assert drift.psi(low, high) > 10


def test_psi_matches_the_textbook_formula() -> None:
    ref = np.array([50, 30, 20])
    live = np.array([30, 30, 40])
    p, q = ref / ref.sum() + drift.PSI_EPSILON, live / live.sum() + drift.PSI_EPSILON
    assert drift.psi(ref, live) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    # 0.2*ln(0.6/... ) by hand: (0.3-0.5)ln(0.3/0.5) + 0 + (0.4-0.2)ln(0.4/0.2)
    assert drift.psi(ref, live) == pytest.approx(-0.2 * math.log(0.6) + 0.2 * math.log(2), rel=1e-3)


def test_histogram_clips_into_the_end_bins() -> None:
    counts = drift.histogram([0.3, 0.5, 0.74, 0.999, 1.0, 1.2], BINS)
    assert counts.sum() == 6
    assert counts[0] == 2 and counts[-1] == 3 and counts[9] == 1


def test_compare_needs_a_minimum_window() -> None:
    ref = drift.Reference(BINS, (1,) * 20, {})
    assert drift.compare("m", 1, ref, [0.9] * (drift.MIN_WINDOW - 1)) is None
    result = drift.compare("m", 1, ref, [0.9] * drift.MIN_WINDOW)
    assert result is not None and result.window == drift.MIN_WINDOW and result.psi > 0.25


@pytest.mark.parametrize(
    ("model", "version"),
    [(m, v) for m, spec in sorted(load_repository(REPOSITORY).items()) for v in spec.versions],
    ids=lambda x: str(x),
)
def test_every_version_ships_a_reference(model: str, version: int) -> None:
    ref = drift.Reference.load(drift.reference_path(REPOSITORY, model, version))
    # The top-class confidence of K classes lies in [1/K, 1].
    classes = len(load_repository(REPOSITORY)[model].labels)
    assert len(ref.counts) == 20 and ref.bins[-1] == 1.0
    assert ref.bins[0] == pytest.approx(1 / classes, abs=1e-4)
    assert sum(ref.counts) > 100
    assert {"0.1", "0.5", "0.9"} <= set(ref.quantiles)


def test_reference_rejects_bad_edges(tmp_path: Any) -> None:
    path = tmp_path / "reference.json"
    path.write_text('{"bins": [0.5, 0.7, 0.6], "counts": [1, 2]}')
    with pytest.raises(ValueError, match="increasing"):
        drift.Reference.load(path)


# --- gauges from a real database ----------------------------------------------------------


@pytest.fixture(scope="module")
def drift_db(database_url: str) -> Iterator[str]:
    """A database of its own, so the synthetic results touch no other test's counts."""
    from orchestrator.store.db import upgrade

    admin = database_url.rsplit("/", 1)[0] + "/test"
    name = f"medtriage_drift_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _insert(
    conn: psycopg.Connection[Any],
    confidences: list[float],
    *,
    version: int = 1,
    arm: str = "live",
    review: str | None = None,
    labels: list[str] | None = None,
    instance_ids: list[Any] | None = None,
) -> list[Any]:
    tenant = conn.execute(
        "INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
        " RETURNING id",
        ("drift-tenant",),
    ).fetchone()[0]
    if instance_ids is None:
        study = conn.execute(
            "INSERT INTO studies (tenant_id, study_uid, status) VALUES (%s, %s, 'done') RETURNING id",
            (tenant, uuid.uuid4().hex),
        ).fetchone()[0]
        series = conn.execute(
            "INSERT INTO series (study_id, series_uid) VALUES (%s, 's') RETURNING id", (study,)
        ).fetchone()[0]
        instance_ids = [
            conn.execute(
                "INSERT INTO instances (study_id, series_id, sop_uid, sop_class_uid, object_key,"
                " size_bytes, sha256) VALUES (%s, %s, %s, 'c', 'k', 1, 'x') RETURNING id",
                (study, series, f"i{i}"),
            ).fetchone()[0]
            for i in range(len(confidences))
        ]
        if review is not None:
            conn.execute(
                "INSERT INTO review_cases (tenant_id, study_id, reasons, status, verdict)"
                " VALUES (%s, %s, '{low_confidence}', 'closed', %s)",
                (tenant, study, review),
            )
    for i, (iid, conf) in enumerate(zip(instance_ids, confidences, strict=True)):
        study_id = conn.execute("SELECT study_id FROM instances WHERE id = %s", (iid,)).fetchone()[
            0
        ]
        conn.execute(
            "INSERT INTO results (study_id, instance_id, model, version, arm, label, confidence,"
            " outputs, latency_ms) VALUES (%s, %s, 'triage', %s, %s, %s, %s, '{}', 1)",
            (study_id, iid, version, arm, (labels or ["normal"] * len(confidences))[i], conf),
        )
    return instance_ids


def test_drift_and_quality_gauges_from_the_database(
    drift_db: str, redis_url: str, queue_prefix: str, storage_dir: Any
) -> None:
    rng = np.random.default_rng(7)
    # A live window that leans to low confidence: clearly drifted from the reference.
    live = list(rng.uniform(0.5, 0.8, size=60))
    with psycopg.connect(drift_db) as conn:
        conn.execute(
            "INSERT INTO model_versions (model, version) VALUES ('triage', 1), ('triage', 2)"
            " ON CONFLICT DO NOTHING"
        )
        first = _insert(conn, live[:30], review="agree")
        _insert(conn, live[30:], review="override")
        # A shadow arm (version 2) on the first 30 images: agrees on 15 of them.
        _insert(
            conn,
            [0.9] * 30,
            version=2,
            arm="shadow",
            labels=["normal"] * 15 + ["pneumonia"] * 15,
            instance_ids=first,
        )
    settings = ApiSettings(
        database_url=drift_db,
        redis_url=redis_url,
        queue_prefix=queue_prefix,
        storage_url=f"file://{storage_dir}",
        drift_refresh_s=0,
    )
    with TestClient(create_app(settings)) as client:
        text = client.get("/metrics").text
    values = {
        (s.name, s.labels.get("model"), s.labels.get("version")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    ref = drift.Reference.load(drift.reference_path(REPOSITORY, "triage", 1))
    expected = drift.compare("triage", 1, ref, live)
    assert expected is not None
    assert values[("medtriage_model_drift_window", "triage", "1")] == 60
    assert values[("medtriage_model_drift_psi", "triage", "1")] == pytest.approx(expected.psi)
    assert values[("medtriage_model_drift_js_distance", "triage", "1")] == pytest.approx(
        expected.js
    )
    assert expected.psi > 1.0  # the committed reference is concentrated near 1.0
    assert values[("medtriage_model_review_share", "triage", "1")] == pytest.approx(1.0)
    assert values[("medtriage_model_review_agreement", "triage", "1")] == pytest.approx(0.5)
    assert values[("medtriage_model_arm_agreement", "triage", "1")] == pytest.approx(0.5)
    # Too few analysis results: the window is reported as 0 and no PSI is invented.
    assert values[("medtriage_model_drift_window", "analysis", "1")] == 0
    assert ("medtriage_model_drift_psi", "analysis", "1") not in values


def test_drift_cli_renders_a_png(drift_db: str, tmp_path: Any) -> None:
    """`medtriage drift` against the same database: a PNG, and the statistics it prints
    are the ones computed from the same window."""
    import os
    import subprocess
    import sys

    with psycopg.connect(drift_db) as conn:
        if len(drift.live_confidences(conn, "triage", 1, 1000)) < drift.MIN_WINDOW:
            _insert(conn, list(np.linspace(0.55, 0.95, 30)))  # run on its own (-k)
    out = tmp_path / "drift.png"
    env = {**os.environ, "MEDTRIAGE_DATABASE_URL": drift_db}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "drift",
            "triage",
            "--version",
            "1",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with psycopg.connect(drift_db) as conn:
        live = drift.live_confidences(conn, "triage", 1, 1000)
    expected = drift.compare(
        "triage", 1, drift.Reference.load(drift.reference_path(REPOSITORY, "triage", 1)), live
    )
    assert expected is not None
    assert f"PSI {expected.psi:.3f} JS {expected.js:.3f}" in result.stdout
