"""Report revisions after the pipeline, and the other formats of a revision.

Revisions are never rewritten: a verdict adds revision N+1 (JSON, from the database as it is
now, verdict included) and the earlier revisions stay in the object store and the
``reports`` table. HTML, PDF and SR are rendered from a stored JSON revision on first
request and stored beside it, so every later request (and every format) of that revision
says the same thing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from uuid import UUID

from psycopg import Connection
from psycopg_pool import ConnectionPool

from orchestrator.errors import DependencyUnavailable, NotFound
from orchestrator.reports import CONTENT_TYPES, EXTENSIONS, context, html, pdf, report, sc, sr
from orchestrator.reports.context import ReportContext
from orchestrator.store.db import studies as db
from orchestrator.store.objects import ObjectStore, report_key

log = logging.getLogger(__name__)


def _put(store: ObjectStore, key: str, body: bytes, content_type: str) -> None:
    # The local store lets OSError through (a full or read-only disk): an answer, not a crash.
    try:
        store.put(key, body, content_type=content_type)
    except OSError as exc:
        raise DependencyUnavailable("object store", type(exc).__name__) from exc


def write_revision(conn: Connection, store: ObjectStore, study_id: UUID) -> int:
    """Write the next JSON revision of ``study_id``'s report in the caller's transaction (so a
    verdict and its report revision commit together); return its number."""
    # The study row lock serialises revision numbers with the worker's report writer.
    db.lock_study(conn, study_id)
    study = db.get_study(conn, study_id, tenant_id=None)
    if study is None:
        raise NotFound(f"study {study_id} not found")
    rows = db.instances(conn, study_id)
    res = db.results(conn, study_id)
    case = db.review_case(conn, study_id)
    revision = db.next_revision(conn, study_id)
    body = report.to_json_bytes(report.build(study, rows, res, case))
    key = report_key(str(study["tenant_id"]), str(study_id), revision, "json")
    _put(store, key, body, "application/json")
    db.insert_report(conn, study_id=study_id, revision=revision, fmt="json", object_key=key)
    log.info("study %s: report revision %d after review", study_id, revision)
    return revision


RENDERERS: dict[str, Callable[[ReportContext, int], bytes]] = {
    "html": html.render,
    "pdf": pdf.render,
    "sr": sr.render,
    "sc": sc.render,
}


def rendered(
    pool: ConnectionPool,
    store: ObjectStore,
    study_id: UUID,
    fmt: str,
    *,
    revision: int | None = None,
) -> tuple[bytes, int]:
    """``fmt`` of ``revision`` (default: the newest) of the study's report, and its number.

    The caller has checked the tenant. Rendering holds the study row, so two first requests
    for one format render it once and both get the stored object.
    """
    with pool.connection() as conn:
        db.lock_study(conn, study_id)
        rows = db.reports(conn, study_id)
        revisions = sorted({r["revision"] for r in rows if r["format"] == "json"}, reverse=True)
        if not revisions:
            raise NotFound(f"study {study_id} has no report yet")
        target = revision if revision is not None else revisions[0]
        if target not in revisions:
            raise NotFound(f"study {study_id} has no report revision {target}")
        stored = {r["format"]: r["object_key"] for r in rows if r["revision"] == target}
        if fmt in stored:
            return store.get(stored[fmt]), target
        report = json.loads(store.get(stored["json"]))
        study = db.get_study(conn, study_id, tenant_id=None)
        assert study is not None
        ctx = context.load(
            store,
            report,
            db.instances(conn, study_id),
            previews=fmt in ("html", "pdf", "sc"),
            sources=fmt in ("sr", "sc"),
        )
        if fmt in ("sr", "sc") and not ctx.sources:
            raise NotFound(f"study {study_id} has no image a DICOM report could reference")
        body = RENDERERS[fmt](ctx, target)
        key = report_key(str(study["tenant_id"]), str(study_id), target, EXTENSIONS[fmt])
        _put(store, key, body, CONTENT_TYPES[fmt])
        db.insert_report(conn, study_id=study_id, revision=target, fmt=fmt, object_key=key)
    log.info("study %s: rendered %s of report revision %d", study_id, fmt, target)
    return body, target
