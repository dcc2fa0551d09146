"""Report revisions after the pipeline: a new one when a reviewer closes a case.

Revisions are never rewritten: a verdict adds revision N+1 (JSON, from the database as it is
now, verdict included) and the earlier revisions stay in the object store and the
``reports`` table.
"""

from __future__ import annotations

import logging
from uuid import UUID

from psycopg_pool import ConnectionPool

from orchestrator import report
from orchestrator.db import claims
from orchestrator.db import studies as db
from orchestrator.storage import ObjectStore, report_key

log = logging.getLogger(__name__)


def after_review(pool: ConnectionPool, store: ObjectStore, study_id: UUID) -> int:
    """Write the next JSON revision of ``study_id``'s report; return its number."""
    with pool.connection() as conn:
        # The study row lock serialises revision numbers with the worker's report writer.
        conn.execute("SELECT 1 FROM studies WHERE id = %s FOR UPDATE", (study_id,))
        study = db.get_study(conn, study_id, tenant_id=None)
        if study is None:
            raise LookupError(f"study {study_id} vanished")
        rows = db.instances(conn, study_id)
        res = db.results(conn, study_id)
        case = db.review_case(conn, study_id)
        revision = claims.next_revision(conn, study_id)
        body = report.to_json_bytes(report.build(study, rows, res, case))
        key = report_key(str(study["tenant_id"]), str(study_id), revision, "json")
        store.put(key, body, content_type="application/json")
        db.insert_report(conn, study_id=study_id, revision=revision, fmt="json", object_key=key)
    log.info("study %s: report revision %d after review", study_id, revision)
    return revision
