"""Exactly-once effects: the same study job delivered twice at the same moment (two threads,
each with the real pipeline over real PostgreSQL, object store and Triton) leaves one result
per (instance, model, version), one report and at most one review case."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
from pydicom.uid import generate_uid

from orchestrator.ingest import core as ingest
from orchestrator.pipeline.context import WorkerContext
from orchestrator.pipeline.study import process_study
from orchestrator.queue import jobs as jobqueue
from orchestrator.queue.worker import build_context
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import WorkerSettings
from orchestrator.store.db import keys

pytestmark = pytest.mark.integration

IMAGES_PER_STUDY = 3
ROUNDS = 4
# Small images keep the rounds quick; the model input is 28×28 either way.
IMAGE_SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)
THREAD_JOIN_S = 120.0


def worker_settings(env: dict[str, str], **extra: Any) -> WorkerSettings:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in env.items()}
    return WorkerSettings(**{**fields, **extra})


@pytest.fixture(scope="module")
def ctx(settings_env: dict[str, str]) -> Iterator[WorkerContext]:
    context = build_context(worker_settings(settings_env), "exactly-once-test")
    yield context
    context.pool.close()


def _new_study(ctx: WorkerContext, database_url: str, make_key: Any) -> UUID:
    key = make_key("uploader", "exactly-once")
    with psycopg.connect(database_url) as conn:
        principal = keys.authenticate(conn, key)
    assert principal is not None
    images, _ = load_samples()
    uid = generate_uid()
    files = [
        (f"i{i}.dcm", radiograph(images[i], study_uid=uid, instance_number=i, size=IMAGE_SIZE))
        for i in range(IMAGES_PER_STUDY)
    ]
    redis = jobqueue.connect(ctx.settings.redis_url)
    # A queue no worker listens to: the two deliveries below are the only runs.
    queue = f"{ctx.settings.queue_prefix}-exactly-once-{uuid.uuid4().hex[:6]}"
    result = ingest.ingest(
        ctx.pool, ctx.store, redis, queue, principal, files, max_pixels=10**8, job_timeout_s=60
    )
    assert result.accepted == IMAGES_PER_STUDY
    study_id = next(iter(result.studies))
    redis.delete(f"rq:queue:{queue}", f"rq:job:{jobqueue.job_id(study_id)}")
    return study_id


@pytest.mark.parametrize("round_no", range(ROUNDS), ids=lambda r: f"round-{r}")
def test_same_job_twice_concurrently_gives_one_result_per_job_and_one_report(
    ctx: WorkerContext, database_url: str, make_key: Any, round_no: int
) -> None:
    study_id = _new_study(ctx, database_url, make_key)
    jid = jobqueue.job_id(study_id)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        barrier.wait()
        try:
            outcomes.append(process_study(ctx, study_id, jid))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(THREAD_JOIN_S)
    assert not errors, errors
    assert len(outcomes) == 2
    with psycopg.connect(database_url) as conn:
        status = conn.execute("SELECT status FROM studies WHERE id = %s", (study_id,)).fetchone()
        per_job = conn.execute(
            "SELECT instance_id, model, version, count(*) FROM results WHERE study_id = %s"
            " GROUP BY 1, 2, 3",
            (study_id,),
        ).fetchall()
        reports = conn.execute(
            "SELECT revision, format FROM reports WHERE study_id = %s", (study_id,)
        ).fetchall()
        reviews = conn.execute(
            "SELECT count(*) FROM review_cases WHERE study_id = %s", (study_id,)
        ).fetchone()
        instance_states = conn.execute(
            "SELECT status, error FROM instances WHERE study_id = %s", (study_id,)
        ).fetchall()
        attempts = conn.execute(
            "SELECT count(*) FROM job_attempts WHERE job_id = %s", (jid,)
        ).fetchone()
    assert status is not None and status[0] in ("done", "needs_review")
    # Every instance ran through both models: one row each, never two.
    assert {(m, n) for _, m, _, n in per_job} == {("triage", 1), ("analysis", 1)}
    assert len({i for i, _, _, _ in per_job}) == IMAGES_PER_STUDY, (outcomes, instance_states)
    assert reports == [(1, "json")]
    assert reviews is not None and reviews[0] <= 1
    # Both deliveries really ran or one saw the study finished; one of them won.
    assert status[0] in outcomes
    assert attempts is not None and 1 <= attempts[0] <= 2
    print(f"\nexactly-once round {round_no}: outcomes={sorted(outcomes)} results/job=1 reports=1")
