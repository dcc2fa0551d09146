"""Study completeness over real PostgreSQL and Redis: arrivals wait for the stable age or a
'complete' signal, and instances that arrive while their study's job runs are queued again
after that run. A database of its own (no other process's sweeper takes its studies) and a
queue no worker reads; the job's state is set by hand."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom.uid import generate_uid
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from orchestrator.ingest import arrivals
from orchestrator.ingest import core as ingest
from orchestrator.queue import jobs as jobqueue
from orchestrator.queue import reconcile
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import WorkerSettings
from orchestrator.store.db import connect_pool, upgrade
from orchestrator.store.db.keys import Principal, ensure_tenant
from orchestrator.store.objects import LocalStore

pytestmark = pytest.mark.integration

ADMIN_DATABASE_URL = os.environ.get(
    "MEDTRIAGE_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

JOB_TIMEOUT_S = 60
LONG_S = 3600.0


@pytest.fixture
def own_database() -> Iterator[str]:
    name = f"medtriage_arrivals_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def env(own_database: str, redis_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    database_url = own_database
    pool = connect_pool(database_url)
    pool.wait()
    redis = Redis.from_url(redis_url)
    queue_name = f"arrivals-test-{uuid.uuid4().hex[:8]}:studies"
    with psycopg.connect(database_url) as conn:
        tenant_id = ensure_tenant(conn, "tenant-arrivals")
    principal = Principal(uuid.uuid4(), tenant_id, "test", "uploader", kind="service")
    yield {
        "pool": pool,
        "redis": redis,
        "queue": queue_name,
        "store": LocalStore(tmp_path / "objects"),
        "principal": principal,
        "database_url": database_url,
    }
    Queue(queue_name, connection=redis).delete(delete_jobs=True)
    pool.close()


def _send(env: dict[str, Any], data: bytes, arrival: tuple[str, bool] | None) -> uuid.UUID:
    result = ingest.ingest(
        env["pool"],
        env["store"],
        env["redis"],
        env["queue"],
        env["principal"],
        [("x.dcm", data)],
        max_pixels=10**8,
        job_timeout_s=JOB_TIMEOUT_S,
        arrival=arrival,
    )
    assert result.files[0].outcome == "accepted"
    (study_id,) = result.studies
    return study_id


def _sweep(env: dict[str, Any], stable_age_s: float = LONG_S) -> list[uuid.UUID]:
    return arrivals.sweep(
        env["pool"],
        env["redis"],
        env["queue"],
        stable_age_s=stable_age_s,
        job_timeout_s=JOB_TIMEOUT_S,
    )


def _row(env: dict[str, Any], study_id: uuid.UUID) -> tuple[str, Any]:
    with psycopg.connect(env["database_url"]) as conn:
        row = conn.execute(
            "SELECT s.status, a.instances FROM studies s"
            " LEFT JOIN study_arrivals a ON a.study_id = s.id WHERE s.id = %s",
            (study_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_arrivals_wait_then_queue_and_a_running_job_is_followed_by_another(
    env: dict[str, Any],
) -> None:
    images, _ = load_samples()
    study_uid, series = generate_uid(), generate_uid()
    a, b, c = (
        radiograph(images[i], study_uid=study_uid, series_uid=series, size=256) for i in range(3)
    )

    study_id = _send(env, a, ("stow", False))
    assert _row(env, study_id) == ("received", 1)
    assert _sweep(env) == []  # neither stable nor complete
    assert _send(env, b, ("stow", False)) == study_id
    assert _row(env, study_id) == ("received", 2)
    # Stable: quiet for longer than a zero stable age.
    assert _sweep(env, stable_age_s=0.0) == [study_id]
    assert _row(env, study_id) == ("queued", None)
    job = Job.fetch(jobqueue.job_id(study_id), connection=env["redis"])
    assert job.get_status() == JobStatus.QUEUED

    # The worker starts the job; a third instance arrives over REST meanwhile.
    job.set_status(JobStatus.STARTED)
    assert _send(env, c, None) == study_id
    assert _row(env, study_id)[1] == 0  # waiting for the running job, marked complete
    assert _sweep(env) == []  # not while it runs
    assert _row(env, study_id)[1] == 0
    first_enqueue = job.enqueued_at
    job.set_status(JobStatus.FINISHED)
    assert _sweep(env) == [study_id]
    assert _row(env, study_id)[1] is None
    again = Job.fetch(jobqueue.job_id(study_id), connection=env["redis"])
    assert again.get_status() == JobStatus.QUEUED
    assert again.enqueued_at is not None and again.enqueued_at > first_enqueue


def _settings(env: dict[str, Any], *, stable_age_s: float, stale_s: float) -> WorkerSettings:
    return WorkerSettings(
        database_url=env["database_url"],
        queue_prefix=env["queue"].removesuffix(":studies"),
        ingest_stable_age_s=stable_age_s,
        reconcile_stale_after_s=stale_s,
        reconcile_interval_s=stale_s,
        job_timeout_s=JOB_TIMEOUT_S,
    )


@pytest.mark.parametrize("source", ["stow", "dimse"])
def test_a_study_waiting_for_its_stable_age_is_not_stale_and_is_queued_once(
    env: dict[str, Any], source: str
) -> None:
    """Issue 15 item 1: with a stable age longer than the reconciler's stale time, the
    reconciler used to requeue the study ('job lost') before it was complete, and the sweeper
    queued it again at the stable age: two runs, the first on part of the study. Shortened:
    stable age 2 s, stale time and reconcile interval 0.25 s; two instances 1 s apart. 'dimse'
    is C-STORE with DIMSE_RELEASE_COMPLETES=false or an aborted association (never complete)."""
    settings = _settings(env, stable_age_s=2.0, stale_s=0.25)
    images, _ = load_samples()
    study_uid, series = generate_uid(), generate_uid()
    first, second = (
        radiograph(images[i], study_uid=study_uid, series_uid=series, size=64) for i in range(2)
    )
    started = time.monotonic()
    study_id = _send(env, first, (source, False))
    queued_at: list[float] = []
    sent_second = False
    while time.monotonic() - started < 5.0:
        if not sent_second and time.monotonic() - started > 1.0:
            assert _send(env, second, (source, False)) == study_id
            sent_second = True
        done = reconcile.reconcile_once(env["pool"], env["redis"], settings)
        assert done.requeued == [] and done.dead_lettered == [], done.public()
        queued_at += [
            time.monotonic() - started
            for _ in _sweep(env, stable_age_s=settings.ingest_stable_age_s)
        ]
        time.sleep(settings.reconcile_interval_s)
    # Once, after the second instance had been quiet for the stable age, never before.
    assert len(queued_at) == 1 and queued_at[0] >= 3.0, queued_at
    assert _row(env, study_id) == ("queued", None)


def test_a_waiting_study_nobody_sweeps_is_requeued_after_its_stable_age(
    env: dict[str, Any],
) -> None:
    """The reconciler still catches a study whose sweeper is gone (its process died)."""
    settings = _settings(env, stable_age_s=0.5, stale_s=0.25)
    images, _ = load_samples()
    study_id = _send(env, radiograph(images[0], study_uid=generate_uid(), size=64), ("stow", False))
    time.sleep(0.3)
    assert reconcile.reconcile_once(env["pool"], env["redis"], settings).requeued == []
    time.sleep(0.6)  # past stable age + stale time, and no sweeper ran
    assert reconcile.reconcile_once(env["pool"], env["redis"], settings).requeued == [study_id]
