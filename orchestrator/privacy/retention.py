"""Retention: per-tenant policies and the purge job.

A policy keeps one kind of data of a tenant for ``max_age`` after the study arrived:

* ``originals`` — the stored DICOM files (instances keep their row, with the object key
  cleared, until the study goes);
* ``previews``  — the JPEG previews;
* ``reports``   — report objects and their rows;
* ``results``   — model results and review cases.

Studies under legal hold are never touched. When a study has lost its originals and has
no reports or results left, the study itself goes: every row that names it (tables with a
``study_id`` column are found through the schema; the others are listed in
``STUDY_REFERENCES``, which a test compares with the schema so a new table cannot be
forgotten), its Redis keys, and its now-empty folders in a local object store.

Two tables name a study inside a JSON document rather than a column:

* ``webhook_deliveries`` — the notice's payload (study id, StudyInstanceUID): deleted, so a
  purged study is no longer listed or redeliverable;
* ``idempotency_keys`` — the first answer to an upload (file names, study ids): replaced by
  a tombstone holding no trace of the upload, so a retry under the same key is told the
  upload was purged (``410 Gone``) instead of a replay that says "accepted" for a study
  that no longer exists. The tombstone expires with the key's TTL like any key.

Each purge is written to the audit trail. ``purge`` is idempotent: run it from cron or a
scheduler as often as wanted; ``dry_run`` reports what it would delete and deletes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

from psycopg import Connection, sql
from redis import Redis

from orchestrator.store.db import connect_pool, idempotency
from orchestrator.store.db.audit import record
from orchestrator.store.db.keys import ensure_tenant
from orchestrator.store.objects import ObjectStore

KINDS = ("originals", "previews", "reports", "results")
# Studies handled per query; a big backlog is worked through in rounds.
BATCH = 500
# Tables never purged: the audit trail is append-only and kept on its own schedule.
_KEEP_TABLES = frozenset({"audit_log"})
_PRINCIPAL = "retention"
# Every column that can name a study (a foreign key to it, a study or UID column, a JSON
# document) and how the purge deals with it. test_retention.py compares this with the
# schema: a table or column added later fails that test until it is listed here.
STUDY_REFERENCES: dict[str, str] = {
    "studies.id": "the study row, deleted last",
    "studies.study_uid": "the study row, deleted last",
    "studies.timings": "the study row, deleted last",
    "series.study_id": "study_id table: rows deleted",
    "series.series_uid": "study_id table: rows deleted",
    "instances.study_id": "study_id table: rows deleted",
    "instances.series_id": "study_id table: rows deleted",
    "instances.sop_uid": "study_id table: rows deleted",
    "instances.sop_class_uid": "study_id table: rows deleted",
    "instances.transfer_syntax_uid": "study_id table: rows deleted",
    "jobs.study_id": "study_id table: rows deleted",
    "job_attempts.job_id": "deleted through jobs (job ids derive from the study id)",
    "results.study_id": "study_id table: rows deleted",
    "results.instance_id": "study_id table: rows deleted",
    "results.outputs": "study_id table: rows deleted",
    "results.findings": "study_id table: rows deleted",
    "review_cases.study_id": "study_id table: rows deleted",
    "review_cases.details": "study_id table: rows deleted",
    "reports.study_id": "study_id table: rows deleted",
    "report_exports.study_id": "study_id table: rows deleted",
    "report_exports.sop_instance_uid": "study_id table: rows deleted",
    "dead_letters.study_id": "study_id table: rows deleted",
    "study_arrivals.study_id": "study_id table: rows deleted",
    "webhook_deliveries.payload": "payload names the study: rows deleted",
    "idempotency_keys.response": "answer names the study: replaced by a purged tombstone",
    "audit_log.detail": "kept: the append-only trail names ids only, never PHI",
    "model_events.before": "model routing and gates only, never a study",
    "model_events.after": "model routing and gates only, never a study",
    "model_events.detail": "model routing and gates only, never a study",
}


@dataclass
class PurgeReport:
    objects: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    redis_keys: int = 0
    studies: list[str] = field(default_factory=list)
    held_skipped: int = 0
    dry_run: bool = False

    def summary(self) -> dict[str, Any]:
        if self.dry_run:
            return {
                "dry_run": True,
                "objects_would_delete": self.objects,
                "rows_would_delete": self.rows,
                "studies_would_delete": len(self.studies),
                "held_studies_skipped": self.held_skipped,
            }
        return {
            "objects_deleted": self.objects,
            "rows_deleted": self.rows,
            "redis_keys_deleted": self.redis_keys,
            "studies_deleted": len(self.studies),
            "held_studies_skipped": self.held_skipped,
        }

    def add_rows(self, table: str, n: int) -> None:
        if n:
            self.rows[table] = self.rows.get(table, 0) + n


def parse_age(text: str) -> timedelta:
    from orchestrator.store.db.keys import parse_duration

    return parse_duration(text)


def set_policy(conn: Connection, tenant: str, kind: str, max_age: timedelta) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    tenant_id = ensure_tenant(conn, tenant)
    conn.execute(
        "INSERT INTO retention_policies (tenant_id, kind, max_age) VALUES (%s, %s, %s)"
        " ON CONFLICT (tenant_id, kind) DO UPDATE SET max_age = EXCLUDED.max_age,"
        " updated_at = now()",
        (tenant_id, kind, max_age),
    )
    record(
        conn,
        tenant_id=tenant_id,
        principal=_PRINCIPAL,
        action="retention.set",
        resource_type="tenant",
        resource_id=str(tenant_id),
        outcome="ok",
        detail={"kind": kind, "max_age_s": max_age.total_seconds()},
    )


def set_legal_hold(
    conn: Connection, study_id: UUID, held: bool, *, actor: str, reason: str = "set in code"
) -> bool:
    """Hold or release one study (any tenant); audited with the reason (see legal_hold)."""
    from orchestrator.privacy import legal_hold

    change = legal_hold.hold if held else legal_hold.release
    try:
        change(conn, study_id, reason=reason, actor=legal_hold.Actor(actor))
    except legal_hold.StudyNotFound:
        return False
    return True


def _expired(conn: Connection, kind: str, extra: str = "") -> list[dict[str, Any]]:
    """Unheld studies whose tenant's ``kind`` policy has run out."""
    cur = conn.execute(
        "SELECT s.id, s.tenant_id FROM studies s JOIN retention_policies p"
        " ON p.tenant_id = s.tenant_id AND p.kind = %s"
        " WHERE NOT s.legal_hold AND s.created_at < now() - p.max_age" + extra + " LIMIT %s",
        (kind, BATCH),
    )
    return [{"id": r[0], "tenant_id": r[1]} for r in cur.fetchall()]


def _audit(conn: Connection, study: dict[str, Any], kind: str, detail: dict[str, Any]) -> None:
    record(
        conn,
        tenant_id=study["tenant_id"],
        principal=_PRINCIPAL,
        action=f"purge.{kind}",
        resource_type="study",
        resource_id=str(study["id"]),
        outcome="ok",
        detail=detail,
    )


def _delete_objects(store: ObjectStore, keys: list[str], report: PurgeReport) -> None:
    for key in keys:
        if key:
            store.delete(key)
            report.objects += 1


def _clear_column(
    conn: Connection, study_id: UUID, column: str, cond: str, value: str
) -> list[str]:
    """Clear an object-key column of a study's instances; return the keys it held."""
    keys = [
        r[0]
        for r in conn.execute(
            sql.SQL("SELECT {} FROM instances WHERE study_id = %s AND " + cond).format(
                sql.Identifier(column)
            ),
            (study_id,),
        )
    ]
    conn.execute(
        sql.SQL("UPDATE instances SET {} = " + value + " WHERE study_id = %s").format(
            sql.Identifier(column)
        ),
        (study_id,),
    )
    return keys


def _study_tables(conn: Connection) -> list[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public'"
        " AND column_name = 'study_id' AND table_name <> ALL(%s)"
        " AND table_name IN (SELECT table_name FROM information_schema.tables"
        "   WHERE table_schema = 'public' AND table_type = 'BASE TABLE')",
        (list(_KEEP_TABLES),),
    ).fetchall()
    return sorted(r[0] for r in rows)


def _redis_keys(redis: Redis, prefix: str, study_id: UUID) -> int:
    """Delete every Redis key naming the study, and its members in RQ's registries."""
    from orchestrator.queue import jobs as jobqueue

    needle = str(study_id)
    deleted = 0
    jid = jobqueue.job_id(study_id)
    for key in list(redis.scan_iter(match=f"*{needle}*")):
        deleted += int(redis.delete(key))
    for key in redis.scan_iter(match="rq:*"):
        kind = redis.type(key)
        if kind == b"zset":
            deleted += int(redis.zrem(key, jid) > 0)
        elif kind == b"list":
            deleted += int(redis.lrem(key, 0, jid) > 0)
        elif kind == b"set":
            deleted += int(redis.srem(key, jid) > 0)
    for key in redis.scan_iter(match=f"{prefix}:*"):
        if redis.type(key) == b"hash" and redis.hdel(key, needle):
            deleted += 1
    return deleted


def _past(kind: str) -> str:
    """SQL: study ``s`` is past its tenant's ``kind`` policy (kind is one of KINDS)."""
    assert kind in KINDS, kind
    return (
        "EXISTS (SELECT 1 FROM retention_policies p WHERE p.tenant_id = s.tenant_id"
        f" AND p.kind = '{kind}' AND s.created_at < now() - p.max_age)"
    )


def _would_delete(conn: Connection, report: PurgeReport) -> None:
    """What ``purge`` would delete now, counted the way it counts what it deletes."""
    report.dry_run = True
    unheld = "FROM studies s WHERE NOT s.legal_hold AND "

    def joined(table: str, kind: str, cond: str = "true") -> int:
        row = conn.execute(
            f"SELECT count(*) FROM {table} x JOIN studies s ON s.id = x.study_id"
            f" WHERE NOT s.legal_hold AND {_past(kind)} AND {cond}"
        ).fetchone()
        return int(row[0]) if row else 0

    # Stored objects: previews, originals and reports.
    report.objects += joined("instances", "previews", "x.preview_key IS NOT NULL")
    report.objects += joined("instances", "originals", "x.object_key <> ''")
    for table, kind in (
        ("reports", "reports"),
        ("results", "results"),
        ("review_cases", "results"),
    ):
        n = joined(table, kind)
        report.add_rows(table, n)
        if table == "reports":
            report.objects += n
    # Whole studies: past originals, and nothing else left once the other kinds are purged.
    gone = conn.execute(
        f"SELECT s.id {unheld}{_past('originals')}"
        f" AND ({_past('previews')} OR NOT EXISTS (SELECT 1 FROM instances i"
        "   WHERE i.study_id = s.id AND i.preview_key IS NOT NULL))"
        f" AND ({_past('reports')} OR NOT EXISTS (SELECT 1 FROM reports r WHERE r.study_id = s.id))"
        f" AND ({_past('results')} OR NOT EXISTS (SELECT 1 FROM results r WHERE r.study_id = s.id))"
    ).fetchall()
    report.studies = [str(r[0]) for r in gone]
    report.add_rows("studies", len(gone))


def _forget_upload(conn: Connection, study: dict[str, Any], counts: dict[str, int]) -> None:
    """Delete the study's webhook notices; replace the Idempotency-Key answers that name it
    by a tombstone that says the upload was purged and keeps nothing of it."""
    needle = str(study["id"])
    counts["webhook_deliveries"] = conn.execute(
        "DELETE FROM webhook_deliveries WHERE tenant_id = %s AND payload->>'study_id' = %s",
        (study["tenant_id"], needle),
    ).rowcount
    counts["idempotency_keys"] = idempotency.forget_study(
        conn, tenant_id=study["tenant_id"], study_id=study["id"]
    )


def purge(
    conn: Connection, store: ObjectStore, redis: Redis, *, prefix: str, dry_run: bool = False
) -> PurgeReport:
    """Delete what each tenant's policies say is past its time; audit every purge."""
    report = PurgeReport()
    report.held_skipped = int(
        conn.execute(
            "SELECT count(DISTINCT s.id) FROM studies s JOIN retention_policies p"
            " ON p.tenant_id = s.tenant_id WHERE s.legal_hold AND s.created_at < now() - p.max_age"
        ).fetchone()[0]  # type: ignore[index]
    )
    if dry_run:
        _would_delete(conn, report)
        return report

    for study in _expired(
        conn,
        "previews",
        " AND EXISTS (SELECT 1 FROM instances i"
        " WHERE i.study_id = s.id AND i.preview_key IS NOT NULL)",
    ):
        keys = _clear_column(conn, study["id"], "preview_key", "preview_key IS NOT NULL", "NULL")
        _delete_objects(store, keys, report)
        _audit(conn, study, "previews", {"objects": len(keys)})
        conn.commit()

    for study in _expired(
        conn, "reports", " AND EXISTS (SELECT 1 FROM reports r WHERE r.study_id = s.id)"
    ):
        keys = [
            r[0]
            for r in conn.execute(
                "DELETE FROM reports WHERE study_id = %s RETURNING object_key", (study["id"],)
            )
        ]
        _delete_objects(store, keys, report)
        report.add_rows("reports", len(keys))
        _audit(conn, study, "reports", {"objects": len(keys)})
        conn.commit()

    for study in _expired(
        conn,
        "results",
        " AND (EXISTS (SELECT 1 FROM results r"
        " WHERE r.study_id = s.id) OR EXISTS (SELECT 1 FROM review_cases c"
        " WHERE c.study_id = s.id))",
    ):
        n_results = conn.execute("DELETE FROM results WHERE study_id = %s", (study["id"],)).rowcount
        n_cases = conn.execute(
            "DELETE FROM review_cases WHERE study_id = %s", (study["id"],)
        ).rowcount
        report.add_rows("results", n_results)
        report.add_rows("review_cases", n_cases)
        _audit(conn, study, "results", {"results": n_results, "review_cases": n_cases})
        conn.commit()

    for study in _expired(
        conn,
        "originals",
        " AND EXISTS (SELECT 1 FROM instances i WHERE i.study_id = s.id AND i.object_key <> '')",
    ):
        keys = _clear_column(conn, study["id"], "object_key", "object_key <> ''", "''")
        _delete_objects(store, keys, report)
        _audit(conn, study, "originals", {"objects": len(keys)})
        conn.commit()

    # Studies with nothing left worth keeping: originals gone, no reports, no results.
    gone = _expired(
        conn,
        "originals",
        " AND NOT EXISTS (SELECT 1 FROM instances i"
        " WHERE i.study_id = s.id AND (i.object_key <> '' OR i.preview_key IS NOT"
        " NULL)) AND NOT EXISTS (SELECT 1 FROM reports r WHERE r.study_id = s.id)"
        " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.study_id = s.id)",
    )
    tables = _study_tables(conn)
    for study in gone:
        counts: dict[str, int] = {}
        # Children first; job_attempts hang off jobs rather than the study.
        n = conn.execute(
            "DELETE FROM job_attempts WHERE job_id IN (SELECT id FROM jobs WHERE study_id = %s)",
            (study["id"],),
        ).rowcount
        counts["job_attempts"] = n
        for table in tables:
            counts[table] = conn.execute(
                sql.SQL("DELETE FROM {} WHERE study_id = %s").format(sql.Identifier(table)),
                (study["id"],),
            ).rowcount
        _forget_upload(conn, study, counts)
        counts["studies"] = conn.execute(
            "DELETE FROM studies WHERE id = %s", (study["id"],)
        ).rowcount
        keys_deleted = _redis_keys(redis, prefix, study["id"])
        report.redis_keys += keys_deleted
        for table, n in counts.items():
            report.add_rows(table, n)
        report.studies.append(str(study["id"]))
        _audit(
            conn,
            study,
            "study",
            {"rows": {k: v for k, v in counts.items() if v}, "redis_keys": keys_deleted},
        )
        conn.commit()
    return report


def purge_from_settings(settings: Any, *, dry_run: bool = False) -> PurgeReport:
    """The CLI's entry: open the store, Redis and the database from settings and purge."""
    from orchestrator.queue import jobs as jobqueue
    from orchestrator.store.db import upgrade
    from orchestrator.store.objects import open_store

    upgrade(settings.database_url)
    store = open_store(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        encryption_keys=settings.storage_encryption_keys,
        s3_sse=settings.s3_sse,
        s3_kms_key_id=settings.s3_kms_key_id,
    )
    redis = jobqueue.connect(settings.redis_url)
    pool = connect_pool(settings.database_url, min_size=1, max_size=1)
    try:
        with pool.connection() as conn:
            return purge(conn, store, redis, prefix=settings.queue_prefix, dry_run=dry_run)
    finally:
        pool.close()
        redis.close()
