"""Backpressure on the real API, PostgreSQL and Redis: past the queue's depth or age limit an
upload is refused with 503 + Retry-After before anything is stored, and accepted again once
the queue drains. No worker consumes this module's queue, so its depth is what we make it."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from redis import Redis
from rq import Queue

from orchestrator.api import create_app
from orchestrator.queue import backpressure
from orchestrator.settings import ApiSettings

pytestmark = pytest.mark.integration

MAX_DEPTH = 3


def _dicom() -> bytes:
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _counts(database_url: str, tenant: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT s.id), count(i.id) FROM studies s"
            " JOIN tenants t ON t.id = s.tenant_id LEFT JOIN instances i ON i.study_id = s.id"
            " WHERE t.name = %s",
            (tenant,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.fixture
def world(settings_env: dict[str, str], make_key: Any) -> Iterator[tuple[TestClient, str, str]]:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    # A queue of its own that no worker reads.
    fields["queue_prefix"] = f"bp-{uuid.uuid4().hex[:8]}"
    fields["max_queue_depth"] = str(MAX_DEPTH)
    fields["max_queue_age_s"] = "0"
    settings = ApiSettings(**fields)
    tenant = f"bp-{uuid.uuid4().hex[:6]}"
    key = make_key("uploader", tenant)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client, settings.queue_name, tenant
    redis = Redis.from_url(settings.redis_url)
    Queue(settings.queue_name, connection=redis).empty()


def _post(client: TestClient) -> Any:
    return client.post("/v1/studies", files=[("files", ("a.dcm", _dicom(), "application/dicom"))])


def test_uploads_past_the_depth_limit_get_503_and_store_nothing(
    world: tuple[TestClient, str, str], database_url: str, redis_url: str
) -> None:
    client, queue_name, tenant = world
    for _ in range(MAX_DEPTH):
        assert _post(client).status_code == 202
    time.sleep(backpressure.SAMPLE_TTL_S + 0.1)  # the gate re-reads the queue at most once a second
    stored = _counts(database_url, tenant)
    assert stored == (MAX_DEPTH, MAX_DEPTH)

    refused = _post(client)

    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= backpressure.RETRY_AFTER_MIN_S
    assert "waiting" in refused.json()["detail"]
    assert _counts(database_url, tenant) == stored  # nothing half-stored

    # The queue drains (a worker took the jobs): uploads are accepted again, by themselves.
    Queue(queue_name, connection=Redis.from_url(redis_url)).empty()
    time.sleep(backpressure.SAMPLE_TTL_S + 0.1)
    assert _post(client).status_code == 202
    assert _counts(database_url, tenant) == (MAX_DEPTH + 1, MAX_DEPTH + 1)


def test_age_limit_asks_for_a_retry_after_its_excess(redis_url: str) -> None:
    """Gate arithmetic against a real queue whose head job was enqueued long ago."""
    redis = Redis.from_url(redis_url)
    name = f"bp-age-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, connection=redis)
    job = queue.enqueue("builtins.print", "x")
    try:
        # Age the head job by rewriting its enqueue time, as if it had waited 400 s.
        assert job.enqueued_at is not None
        job.enqueued_at -= timedelta(seconds=400)
        job.save()
        gate = backpressure.Gate(max_depth=0, max_age_s=100)
        with pytest.raises(backpressure.Overloaded) as refused:
            gate.check(redis, name)
        assert refused.value.http_status == 503
        assert int(refused.value.headers["Retry-After"]) == backpressure.RETRY_AFTER_MAX_S
        # Limits of 0 are off: nothing is refused.
        backpressure.Gate(max_depth=0, max_age_s=0).check(redis, name)
    finally:
        queue.empty()
