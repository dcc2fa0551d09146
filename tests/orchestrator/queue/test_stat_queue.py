"""STAT studies go to the front of the job queue; routine ones wait their turn.

Real PostgreSQL, Redis and a local object store; the queue is one no worker listens to, so the
order RQ would hand jobs out is read straight from it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from pydicom.uid import generate_uid
from redis import Redis
from rq import Queue

from orchestrator.ingest import core as ingest
from orchestrator.queue import deadletter
from orchestrator.queue import jobs as jobqueue
from orchestrator.samples import load_samples, radiograph
from orchestrator.store.db import keys
from orchestrator.store.objects import LocalStore

pytestmark = pytest.mark.integration


def test_a_stat_study_is_queued_ahead_of_waiting_routine_ones(
    pool: ConnectionPool, database_url: str, redis_url: str, make_key: Any, tmp_path: Path
) -> None:
    with psycopg.connect(database_url) as conn:
        principal = keys.authenticate(conn, make_key("uploader", "stat-queue"))
    assert principal is not None
    redis = jobqueue.connect(redis_url)
    queue = f"medtriage-stat-queue-{uuid.uuid4().hex[:6]}"
    store = LocalStore(tmp_path / "store")
    send = _sender(pool, store, redis, queue, principal)
    try:
        first, second = send("routine"), send("routine")
        urgent = send("stat")
        later = send("routine")
        waiting = Queue(queue, connection=redis).get_job_ids()
        assert waiting == [jobqueue.job_id(s) for s in (urgent, first, second, later)]
    finally:
        Queue(queue, connection=redis).empty()


def test_a_requeued_stat_study_goes_to_the_front_too(
    pool: ConnectionPool, database_url: str, redis_url: str, make_key: Any, tmp_path: Path
) -> None:
    """A dead-lettered STAT study sent back (``medtriage requeue``) does not wait behind the
    routine backlog; a routine one does."""
    with psycopg.connect(database_url) as conn:
        principal = keys.authenticate(conn, make_key("uploader", "stat-requeue"))
    assert principal is not None
    redis = jobqueue.connect(redis_url)
    queue = f"medtriage-stat-requeue-{uuid.uuid4().hex[:6]}"
    send = _sender(pool, LocalStore(tmp_path / "store"), redis, queue, principal)
    try:
        stat, routine = send("stat"), send("routine")
        Queue(queue, connection=redis).empty()
        with pool.connection() as conn:
            for study in (stat, routine):
                assert deadletter.add(conn, study, reason="test", attempts=6)
        backlog = [send("routine"), send("routine")]
        deadletter.requeue(pool, redis, queue, [routine, stat], job_timeout_s=60)
        waiting = Queue(queue, connection=redis).get_job_ids()
        assert waiting == [jobqueue.job_id(s) for s in (stat, *backlog, routine)]
    finally:
        Queue(queue, connection=redis).empty()


def _sender(
    pool: ConnectionPool, store: LocalStore, redis: Redis, queue: str, principal: keys.Principal
) -> Callable[[str], UUID]:
    images, _ = load_samples()

    def send(priority: str) -> UUID:
        uid = generate_uid()
        data = radiograph(images[0], study_uid=uid, size=256)
        result = ingest.ingest(
            pool,
            store,
            redis,
            queue,
            principal,
            [("x.dcm", data)],
            max_pixels=10**8,
            job_timeout_s=60,
            priority=priority,
        )
        assert result.accepted == 1
        return next(iter(result.studies))

    return send
