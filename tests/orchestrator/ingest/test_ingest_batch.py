"""A request's files are recorded in one transaction: all of them or none.

Real PostgreSQL and a real local object store; the store is wrapped to fail on one put (as an
object store that goes away mid-request would), the only fake here.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from pydicom.uid import generate_uid

from orchestrator.errors import StorageError
from orchestrator.ingest import core as ingest
from orchestrator.queue import jobs as jobqueue
from orchestrator.samples import load_samples, radiograph
from orchestrator.store.db import keys
from orchestrator.store.objects import LocalStore

pytestmark = pytest.mark.integration

FILES = 5
IMAGE_SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)


class FailingStore(LocalStore):
    """A local store whose ``fail_at``-th put (1-based) raises, like a store that went away."""

    def __init__(self, root: Path, fail_at: int) -> None:
        super().__init__(root)
        self.fail_at = fail_at
        self.puts = 0

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise StorageError("store went away")
        super().put(key, data, content_type=content_type)


def _series(study_uid: str) -> list[tuple[str, bytes | Path]]:
    images, _ = load_samples()
    return [
        (f"{i}.dcm", radiograph(images[i], study_uid=study_uid, instance_number=i, size=IMAGE_SIZE))
        for i in range(FILES)
    ]


def _rows(database_url: str, study_uid: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(i.id) FROM studies s LEFT JOIN instances i ON i.study_id = s.id"
            " WHERE s.study_uid = %s",
            (study_uid,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_failure_mid_request_leaves_no_rows_and_no_objects(
    pool: ConnectionPool, database_url: str, redis_url: str, make_key: Any, tmp_path: Path
) -> None:
    redis = jobqueue.connect(redis_url)
    # A queue no worker listens to (the study is queued after a successful request).
    queue = f"medtriage-ingest-batch-{uuid.uuid4().hex[:6]}"

    def send(store: LocalStore, files: list[tuple[str, bytes | Path]]) -> list[Any]:
        result = ingest.ingest(
            pool, store, redis, queue, principal, files, max_pixels=10**8, job_timeout_s=60
        )
        return result.files

    with psycopg.connect(database_url) as conn:
        principal = keys.authenticate(conn, make_key("uploader", "ingest-batch"))
    assert principal is not None
    uid = generate_uid()
    files = _series(uid)
    store = FailingStore(tmp_path / "store", fail_at=4)
    with pytest.raises(StorageError):
        send(store, files)
    assert store.puts == 4  # three objects were written before the failure...
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # ...and removed
    assert _rows(database_url, uid) == 0

    # The client's retry of the same request stores every file once.
    store = FailingStore(tmp_path / "store", fail_at=0)
    outcomes = send(store, files)
    assert [o.outcome for o in outcomes] == [ingest.ACCEPTED] * FILES
    assert len([p for p in (tmp_path / "store").rglob("*") if p.is_file()]) == FILES
    assert _rows(database_url, uid) == FILES
    # And again: duplicates, nothing new stored.
    again = send(store, files)
    assert [o.outcome for o in again] == [ingest.DUPLICATE] * FILES
    assert _rows(database_url, uid) == FILES
    redis.delete(f"rq:queue:{queue}")
