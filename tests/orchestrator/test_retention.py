"""Retention over the real stack: a seconds-long policy purges a processed study from the
object store, PostgreSQL and Redis (0 leftovers), audits it, and leaves a study under legal
hold and another tenant's study untouched."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from redis import Redis

from orchestrator import queue as jobqueue
from orchestrator.retention import KINDS, set_legal_hold, set_policy

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
POLICY = timedelta(seconds=1)


def _upload(client: httpx.Client) -> str:
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    buf = io.BytesIO()
    ds.save_as(buf)
    r = client.post(
        "/v1/studies", files=[("files", ("r.dcm", buf.getvalue(), "application/dicom"))]
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait(client: httpx.Client, study_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while client.get(f"/v1/studies/{study_id}").json()["status"] not in TERMINAL:
        assert time.monotonic() < deadline, study_id
        time.sleep(0.3)


def _footprint(database_url: str, redis: Redis, storage_dir: Path, study_id: str) -> dict[str, int]:
    """Everything that still names the study, outside the audit trail."""
    found: dict[str, int] = {}
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT c.table_name FROM information_schema.columns c JOIN information_schema.tables t"
                " USING (table_schema, table_name) WHERE c.table_schema = 'public'"
                " AND c.column_name = 'study_id' AND t.table_type = 'BASE TABLE'"
                " AND c.table_name <> 'audit_log'"
            )
        ]
        for table in tables:
            n = conn.execute(f'SELECT count(*) FROM "{table}" WHERE study_id = %s', (study_id,))
            found[table] = n.fetchone()[0]  # type: ignore[index]
        found["studies"] = conn.execute(
            "SELECT count(*) FROM studies WHERE id = %s", (study_id,)
        ).fetchone()[0]  # type: ignore[index]
        found["job_attempts"] = conn.execute(
            "SELECT count(*) FROM job_attempts WHERE job_id = %s",
            (jobqueue.job_id(UUID(study_id)),),
        ).fetchone()[0]  # type: ignore[index]
    found["objects"] = sum(1 for p in storage_dir.rglob("*") if p.is_file() and study_id in str(p))
    jid = jobqueue.job_id(UUID(study_id)).encode()
    keys = [k for k in redis.scan_iter(match=f"*{study_id}*")]
    members = 0
    for key in redis.scan_iter(match="rq:*"):
        kind = redis.type(key)
        if (
            kind == b"zset"
            and redis.zscore(key, jid) is not None
            or kind == b"list"
            and jid in redis.lrange(key, 0, -1)
        ):
            members += 1
    found["redis_keys"] = len(keys)
    found["redis_members"] = members
    return {k: v for k, v in found.items() if v}


def test_purge_removes_expired_studies_everywhere_and_nothing_else(
    stack: Any,
    make_key: Any,
    database_url: str,
    redis_url: str,
    storage_dir: Path,
    settings_env: dict[str, str],
) -> None:
    purge_key, keep_key = make_key("uploader", "tenant-ret"), make_key("uploader", "tenant-keep")
    with (
        httpx.Client(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {purge_key}"}, timeout=60
        ) as c,
        httpx.Client(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {keep_key}"}, timeout=60
        ) as k,
    ):
        expired, held, other = _upload(c), _upload(c), _upload(k)
        for client, sid in ((c, expired), (c, held), (k, other)):
            _wait(client, sid)
    redis = Redis.from_url(redis_url)
    # A finished job leaves its keys for queue.RESULT_TTL_S only; a failed or retried one
    # leaves them (its job hash, a registry entry) until failure_ttl. Leave what it would for
    # the expired study, so the purge has Redis keys to remove whenever it runs.
    jid = jobqueue.job_id(UUID(expired))
    redis.hset(f"rq:job:{jid}", mapping={"status": "failed", "description": "test"})
    redis.zadd("rq:failed:medtriage-retention-test", {jid: time.time()})
    before = {
        sid: _footprint(database_url, redis, storage_dir, sid) for sid in (expired, held, other)
    }
    # The processed study really had originals, previews, reports, results and RQ keys.
    assert {"instances", "results", "reports", "objects", "redis_keys", "redis_members"} <= set(
        before[expired]
    )
    assert before[expired]["objects"] >= 3
    with psycopg.connect(database_url) as conn:
        for kind in KINDS:
            set_policy(conn, "tenant-ret", kind, POLICY)
        assert set_legal_hold(conn, UUID(held), True, actor="test")
    time.sleep(POLICY.total_seconds() + 0.5)

    env = {**os.environ, **settings_env}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "purge"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["studies_deleted"] >= 1 and summary["held_studies_skipped"] >= 1

    leftovers = _footprint(database_url, redis, storage_dir, expired)
    print(f"\npurge leftovers: {sum(leftovers.values())} {leftovers}")
    assert leftovers == {}
    assert _footprint(database_url, redis, storage_dir, held) == before[held]
    assert _footprint(database_url, redis, storage_dir, other) == before[other]
    with psycopg.connect(database_url) as conn:
        actions = {
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_log WHERE resource_id = %s AND principal = 'retention'",
                (expired,),
            )
        }
    assert {
        "purge.originals",
        "purge.previews",
        "purge.reports",
        "purge.results",
        "purge.study",
    } <= actions
    # A second run finds nothing more to do.
    again = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "purge"], env=env, capture_output=True, text=True
    )
    assert json.loads(again.stdout)["objects_deleted"] == 0
