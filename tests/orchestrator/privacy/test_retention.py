"""Retention over the real stack: a seconds-long policy purges a processed study from the
object store (files and folders), PostgreSQL (every table, webhook deliveries and
Idempotency-Key answers included) and Redis (0 leftovers), audits it, answers a replay of its
upload with 410, and leaves a study under legal hold and another tenant's study untouched.
The schema test makes a table or column that can name a study fail until the purge covers it."""

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
from pydicom.uid import generate_uid
from redis import Redis

from orchestrator.privacy.retention import KINDS, STUDY_REFERENCES, set_legal_hold, set_policy
from orchestrator.queue import jobs as jobqueue
from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
POLICY = timedelta(seconds=1)


def _chest_film() -> bytes:
    """A paediatric chest CR film the chest models take (a CT slice is not_applicable)."""
    images, _ = load_samples()
    return radiograph(images[0], study_uid=generate_uid(), size=256)


def _dicom() -> bytes:
    ds = dcmread(io.BytesIO(_chest_film()))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _upload(
    client: httpx.Client, data: bytes | None = None, headers: dict[str, str] | None = None
) -> str:
    r = client.post(
        "/v1/studies",
        files=[("files", ("r.dcm", data or _dicom(), "application/dicom"))],
        headers=headers,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _mentions(database_url: str, needles: list[str]) -> dict[str, int]:
    """Rows of any table (outside the audit trail) whose text names one of ``needles``."""
    found: dict[str, int] = {}
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                " AND table_type = 'BASE TABLE' AND table_name <> 'audit_log'"
            )
        ]
        for table in tables:
            for needle in needles:
                row = conn.execute(
                    f'SELECT count(*) FROM "{table}" t WHERE strpos(t::text, %s) > 0', (needle,)
                ).fetchone()
                if row and row[0]:
                    found[f"{table}:{needle[:12]}"] = row[0]
    return found


def _study_columns(conn: psycopg.Connection) -> set[str]:
    """Every column that can name a study: foreign keys leading to studies (through other
    tables too), columns named for studies or UIDs, and JSON documents."""
    edges = conn.execute(
        "SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text"
        " FROM pg_constraint c JOIN pg_attribute a"
        " ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) WHERE c.contype = 'f'"
    ).fetchall()
    linked, columns = {"studies"}, {"studies.id"}
    while True:
        new = {f"{t}.{col}" for t, col, ref in edges if ref in linked} - columns
        if not new:
            break
        columns |= new
        linked |= {c.split(".")[0] for c in new}
    for table, column, kind in conn.execute(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c"
        " JOIN information_schema.tables t USING (table_schema, table_name)"
        " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
    ):
        if "study" in column or "uid" in column or kind in ("json", "jsonb"):
            columns.add(f"{table}.{column}")
    return columns


def test_purge_covers_every_column_that_can_name_a_study(database_url: str) -> None:
    """A new table or column that can name a study fails here until retention.py says how
    the purge removes it (or why it is kept)."""
    with psycopg.connect(database_url) as conn:
        found = _study_columns(conn)
    assert found == set(STUDY_REFERENCES), (
        f"not covered by the purge: {sorted(found - set(STUDY_REFERENCES))};"
        f" listed but gone from the schema: {sorted(set(STUDY_REFERENCES) - found)}"
    )
    # What is said to be deleted through its study_id column has one (the purge's loop).
    with psycopg.connect(database_url) as conn:
        for column, how in STUDY_REFERENCES.items():
            if how.startswith("study_id table"):
                table = column.split(".")[0]
                assert conn.execute(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = 'public'"
                    " AND table_name = %s AND column_name = 'study_id'",
                    (table,),
                ).fetchone(), column


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
        # The tenant has a webhook endpoint (its deliveries name the study) and the expired
        # study is uploaded under an Idempotency-Key (its answer names file and study).
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO webhooks (tenant_id, url, secret)"
                " SELECT id, 'http://127.0.0.1:9/hook', 'x' FROM tenants WHERE name = 'tenant-ret'"
            )
        expired_file = _dicom()
        replay = {"Idempotency-Key": f"ret-{generate_uid()}"}
        expired = _upload(c, expired_file, replay)
        held, other = _upload(c), _upload(k)
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
    ds = dcmread(io.BytesIO(expired_file))
    needles = [expired, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)]
    named = _mentions(database_url, needles)
    assert any(k.startswith("webhook_deliveries:") for k in named), named
    assert any(k.startswith("idempotency_keys:") for k in named), named

    env = {**os.environ, **settings_env}
    dry = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "purge", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert "rows_deleted" not in would and "objects_deleted" not in would, would
    assert would["dry_run"] is True and would["studies_would_delete"] >= 1, would
    assert would["objects_would_delete"] >= 3 and would["rows_would_delete"]["reports"] >= 1
    assert _footprint(database_url, redis, storage_dir, expired) == before[expired]
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
    # Nothing outside the audit trail names the study, its StudyInstanceUID or its
    # SOPInstanceUID, and no folder of the object store is left for it.
    assert _mentions(database_url, needles) == {}
    assert [p for p in storage_dir.rglob("*") if expired in str(p)] == []
    # A retry of the purged upload under its Idempotency-Key is told so, and stores nothing.
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {purge_key}"}, timeout=60
    ) as c:
        r = c.post(
            "/v1/studies",
            files=[("files", ("r.dcm", expired_file, "application/dicom"))],
            headers=replay,
        )
        assert r.status_code == 410, r.text
        assert "retention" in r.json()["detail"] and "new Idempotency-Key" in r.json()["detail"]
        assert c.get(f"/v1/studies/{expired}").status_code == 404
    assert _mentions(database_url, needles[1:]) == {}
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
