"""Triton outputs are checked (shape, dtype, NaN/inf) before any result or report is built
from them: ``check_outputs`` against the real model specs, and the pipeline over the real
PostgreSQL, object store and Triton with a client wrapper that corrupts chosen responses
(the same InferenceClient interface): only the affected instances fail, with the reason."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from orchestrator.api import create_app
from orchestrator.inference import routing
from orchestrator.inference.client import PRIORITY_DEFAULT, TritonInference, check_outputs
from orchestrator.inference.specs import ModelSpec, load_repository
from orchestrator.pipeline.context import WorkerContext
from orchestrator.pipeline.study import process_study
from orchestrator.queue.jobs import job_id
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT, ApiSettings, WorkerSettings
from orchestrator.store.db import connect_pool
from orchestrator.store.objects import open_store
from orchestrator.triage.applicability import load_sets

MODELS = load_repository(REPO_ROOT / "model_repository")
BATCH = 3
Corrupt = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def _good(spec: ModelSpec, batch: int = BATCH) -> dict[str, np.ndarray]:
    return {t.name: np.full((batch, *t.dims), 0.5, dtype=np.float32) for t in spec.outputs}


def _with(outputs: dict[str, np.ndarray], name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**outputs, name: value}


def _nan_row(array: np.ndarray, row: int, value: float = np.nan) -> np.ndarray:
    out = array.copy()
    out[row].flat[-1] = value
    return out


def test_good_outputs_pass() -> None:
    for spec in MODELS.values():
        check = check_outputs(spec, BATCH, _good(spec))
        assert check.batch_problem is None and check.row_problems == {}
        assert [check.problem(i) for i in range(BATCH)] == [None] * BATCH


BATCH_PROBLEMS = [
    ("missing", lambda o: {k: v for k, v in o.items() if k != "heatmap"}, "is missing"),
    ("empty", lambda o: _with(o, "probs", np.zeros((0, 2), np.float32)), "has shape (0, 2)"),
    ("short-batch", lambda o: _with(o, "probs", o["probs"][:2]), "expected (3, 2)"),
    ("flat", lambda o: _with(o, "heatmap", o["heatmap"].reshape(BATCH, 49)), "has shape (3, 49)"),
    ("fp64", lambda o: _with(o, "probs", o["probs"].astype(np.float64)), "is float64"),
    ("int", lambda o: _with(o, "heatmap", o["heatmap"].astype(np.int32)), "expected float32"),
]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(c, m) for _, c, m in BATCH_PROBLEMS],
    ids=[i for i, _, _ in BATCH_PROBLEMS],
)
def test_shape_and_dtype_problems_condemn_the_batch(corrupt: Corrupt, message: str) -> None:
    spec = MODELS["analysis"]
    check = check_outputs(spec, BATCH, corrupt(_good(spec)))
    assert check.batch_problem is not None and message in check.batch_problem
    assert all(check.problem(i) == check.batch_problem for i in range(BATCH))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_condemn_their_row_only(value: float) -> None:
    spec = MODELS["analysis"]
    outputs = _good(spec)
    outputs["heatmap"] = _nan_row(outputs["heatmap"], 1, value)
    outputs["probs"] = _nan_row(outputs["probs"], 2, value)
    check = check_outputs(spec, BATCH, outputs)
    assert check.batch_problem is None
    assert check.row_problems == {
        1: "output 'heatmap' holds NaN or infinity",
        2: "output 'probs' holds NaN or infinity",
    }
    assert check.problem(0) is None


class CorruptingInference(TritonInference):
    """The real Triton client, with chosen responses damaged on the way back."""

    def __init__(self, url: str, corrupt: dict[str, Corrupt]) -> None:
        super().__init__(url)
        self.corrupt = corrupt

    def infer(
        self,
        spec: ModelSpec,
        version: int,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: int = PRIORITY_DEFAULT,
        timeout_s: float,
    ) -> dict[str, np.ndarray]:
        out = super().infer(spec, version, inputs, priority=priority, timeout_s=timeout_s)
        damage = self.corrupt.get(spec.name)
        return damage(spec.name, out) if damage else out


def _run(settings_env: dict[str, str], make_key: Any, corrupt: dict[str, Corrupt]) -> Any:
    """Upload a three-instance study through the real API (to a queue nobody serves) and run
    the pipeline here with the corrupting client; returns (status, study, instances, report)."""
    env = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    env["queue_prefix"] = f"outputs-{uuid.uuid4().hex[:6]}"
    key = make_key("uploader", "tenant-outputs")
    images, _ = load_samples()
    study_uid = generate_uid()
    files = [
        (
            "files",
            (
                f"{i}.dcm",
                radiograph(images[i], study_uid=study_uid, size=256, instance_number=i + 1),
                "application/dicom",
            ),
        )
        for i in range(BATCH)
    ]
    with TestClient(create_app(ApiSettings(**env))) as api:
        r = api.post("/v1/studies", files=files, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202, r.text
        study_id = uuid.UUID(r.json()["id"])
        settings = WorkerSettings(**env)
        pool = connect_pool(settings.database_url, max_size=2)
        inference = CorruptingInference(settings.triton_grpc_url, corrupt)
        with pool.connection() as conn:
            routing.sync_versions(conn, {m: s.versions for m, s in MODELS.items()})
        try:
            ctx = WorkerContext(
                settings=settings,
                pool=pool,
                store=open_store(settings.storage_url),
                inference=inference,
                models=MODELS,
                sets=load_sets(REPO_ROOT / "model_repository", MODELS),
                worker_name="outputs-test",
            )
            status = process_study(ctx, study_id, job_id(study_id))
        finally:
            pool.close()
            inference.close()
        report = api.get(
            f"/v1/studies/{study_id}/report", headers={"Authorization": f"Bearer {key}"}
        )
    with psycopg.connect(settings.database_url) as conn:
        study = conn.execute(
            "SELECT status, error FROM studies WHERE id = %s", (study_id,)
        ).fetchone()
        instances = conn.execute(
            "SELECT i.status, i.error,"
            " (SELECT count(*) FROM results r WHERE r.instance_id = i.id AND r.arm = 'live'"
            "  AND r.model = 'triage'),"
            " (SELECT count(*) FROM results r WHERE r.instance_id = i.id AND r.arm = 'live'"
            "  AND r.model = 'analysis')"
            " FROM instances i WHERE i.study_id = %s ORDER BY i.status, i.error",
            (study_id,),
        ).fetchall()
    return status, study, instances, report


@pytest.mark.integration
def test_pipeline_fails_only_the_instances_with_unusable_outputs(
    settings_env: dict[str, str], make_key: Any
) -> None:
    # The second instance in each call: NaN triage probabilities, then an +inf heatmap.
    def triage(_: str, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**out, "probs": _nan_row(out["probs"], 1)}

    def analysis(_: str, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**out, "heatmap": _nan_row(out["heatmap"], 1, np.inf)}

    status, study, instances, report = _run(
        settings_env, make_key, {"triage": triage, "analysis": analysis}
    )
    assert status == "needs_review" and study[0] == "needs_review", (status, study)
    done, in_analysis, in_triage = instances  # ordered by status, then error
    assert done == ("done", None, 1, 1), done
    # The second instance triage saw: failed there, and nothing stored from its NaN output.
    assert in_triage[0] == "failed" and in_triage[2:] == (0, 0), in_triage
    assert re.fullmatch(
        r"invalid_output: triage v\d+: output 'probs' holds NaN or infinity", in_triage[1]
    )
    # The second of the two left for analysis: its triage result stands, no analysis result.
    assert in_analysis[0] == "failed" and in_analysis[2:] == (1, 0), in_analysis
    assert re.fullmatch(
        r"invalid_output: analysis v\d+: output 'heatmap' holds NaN or infinity", in_analysis[1]
    )
    # The report is built only from checked outputs: no NaN/inf anywhere in it.
    assert report.status_code == 200, report.text

    def no_constants(name: str) -> Any:
        raise AssertionError(f"the report holds a {name} value")

    body = json.loads(report.text, parse_constant=no_constants)
    text = json.dumps(body)
    # The failed instances are in the report with their reasons, and the gate says so.
    assert in_triage[1] in text and in_analysis[1] in text
    assert "instance_failed" in text


@pytest.mark.integration
def test_a_wrong_dtype_fails_every_instance_and_the_study(
    settings_env: dict[str, str], make_key: Any
) -> None:
    def triage(_: str, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**out, "probs": out["probs"].astype(np.float64)}

    status, study, instances, _ = _run(settings_env, make_key, {"triage": triage})
    assert status == "failed" and study == ("failed", "no instance has usable model outputs")
    for state, error, triage_results, analysis_results in instances:
        assert state == "failed" and (triage_results, analysis_results) == (0, 0)
        assert re.fullmatch(
            r"invalid_output: triage v\d+: output 'probs' is float64, expected float32 \(FP32\)",
            error,
        ), error
    assert len(instances) == BATCH
