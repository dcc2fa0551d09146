"""STAT studies reach Triton at priority 1, routine ones at the model's default level.

The pipeline runs in this process over the real PostgreSQL, object store and Triton; a thin
wrapper around the real Triton client records the priority of every call.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from orchestrator.api import create_app
from orchestrator.inference import routing
from orchestrator.inference.client import PRIORITY_DEFAULT, PRIORITY_STAT, TritonInference
from orchestrator.inference.specs import ModelSpec, load_repository
from orchestrator.pipeline.context import WorkerContext
from orchestrator.pipeline.study import process_study
from orchestrator.queue.jobs import job_id
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import ApiSettings, WorkerSettings
from orchestrator.store.db import connect_pool
from orchestrator.store.objects import open_store
from orchestrator.triage.applicability import load_sets

pytestmark = pytest.mark.integration


class RecordingInference(TritonInference):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[tuple[str, int, int]] = []

    def infer(
        self,
        spec: ModelSpec,
        version: int,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: int = PRIORITY_DEFAULT,
        timeout_s: float,
    ) -> dict[str, np.ndarray]:
        self.calls.append((spec.name, version, priority))
        return super().infer(spec, version, inputs, priority=priority, timeout_s=timeout_s)


@pytest.mark.parametrize(
    ("dicom_priority", "query", "expected"),
    [
        ("STAT", None, PRIORITY_STAT),
        (None, "stat", PRIORITY_STAT),
        (None, None, PRIORITY_DEFAULT),
    ],
    ids=["dicom-tag-stat", "request-field-stat", "routine"],
)
def test_stat_studies_are_sent_at_priority_one(
    settings_env: dict[str, str],
    make_key: Any,
    dicom_priority: str | None,
    query: str | None,
    expected: int,
) -> None:
    # A queue no worker listens on: this test runs the job itself.
    env = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    env["queue_prefix"] = f"priority-{uuid.uuid4().hex[:6]}"
    key = make_key("uploader", "priority")
    images, _ = load_samples()
    data = radiograph(images[0], study_uid=generate_uid(), size=256, priority=dicom_priority)
    with TestClient(create_app(ApiSettings(**env))) as api:
        response = api.post(
            "/v1/studies",
            params={"priority": query} if query else None,
            files=[("files", ("x.dcm", data, "application/dicom"))],
            headers={"Authorization": f"Bearer {key}"},
        )
    assert response.status_code == 202, response.text
    study_id = uuid.UUID(response.json()["id"])

    settings = WorkerSettings(**env)
    pool = connect_pool(settings.database_url, max_size=2)
    inference = RecordingInference(settings.triton_grpc_url)
    models = load_repository(Path(settings.model_repository))
    with pool.connection() as conn:  # what a starting worker does
        routing.sync_versions(conn, {m: spec.versions for m, spec in models.items()})
    try:
        ctx = WorkerContext(
            settings=settings,
            pool=pool,
            store=open_store(settings.storage_url),
            inference=inference,
            models=models,
            sets=load_sets(Path(settings.model_repository), models),
            worker_name="priority-test",
        )
        status = process_study(ctx, study_id, job_id(study_id))
    finally:
        pool.close()
        inference.close()
    assert status in ("done", "needs_review")
    live = [c for c in inference.calls if c[0] in ("triage", "analysis")]
    assert {c[0] for c in live} == {"triage", "analysis"}
    assert {c[2] for c in live} == {expected}
    with psycopg.connect(settings.database_url) as conn:
        stored = conn.execute("SELECT priority FROM studies WHERE id = %s", (study_id,)).fetchone()
    assert stored[0] == ("stat" if expected == PRIORITY_STAT else "routine")
