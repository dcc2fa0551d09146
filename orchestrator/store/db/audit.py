"""The audit trail: one row per read of patient data, per change, per refused login.

Append-only and hash-chained (migration 0006): the database assigns ``seq``, ``prev_hash``
and ``row_hash`` under an advisory lock and refuses UPDATE/DELETE/TRUNCATE; ``verify``
recomputes the hashes and links here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# Longest resource_id stored as is: in UTF-8 at most 4x this in bytes, well under the
# 2704 bytes btree allows the (resource_type, resource_id) index row.
RESOURCE_ID_MAX = 256
# Characters of an over-long resource_id kept in front of its digest.
_BOUNDED_PREFIX = RESOURCE_ID_MAX - 80


def _bounded(resource_id: str) -> str:
    # Distinct long values stay distinct: the digest covers the whole value.
    digest = hashlib.sha256(resource_id.encode()).hexdigest()
    return f"{resource_id[:_BOUNDED_PREFIX]}...sha256:{digest}"


def record(
    conn: Connection,
    *,
    principal: str,
    action: str,
    resource_type: str,
    resource_id: str | None,
    outcome: str,
    tenant_id: UUID | None = None,
    principal_id: UUID | None = None,
    request_id: str | None = None,
    source_ip: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One row. A ``resource_id`` over ``RESOURCE_ID_MAX`` characters (a request path, say)
    is stored bounded, its whole value in ``detail["resource_id"]``: unbounded, it could
    pass the ``audit_log_resource`` index's row limit and the row would be refused."""
    if resource_id is not None and len(resource_id) > RESOURCE_ID_MAX:
        detail = {**(detail or {}), "resource_id": resource_id}
        resource_id = _bounded(resource_id)
    conn.execute(
        "INSERT INTO audit_log (tenant_id, principal_id, principal, action, resource_type,"
        " resource_id, outcome, request_id, source_ip, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            tenant_id,
            principal_id,
            principal,
            action,
            resource_type,
            resource_id,
            outcome,
            request_id,
            source_ip,
            Jsonb(detail or {}),
        ),
    )


STORED_OUTCOMES = ("accepted", "duplicate")


def record_upload(
    conn: Connection,
    *,
    studies: Mapping[UUID, Mapping[str, int]],
    principal: str,
    action: str,
    detail: dict[str, Any],
    tenant_id: UUID | None = None,
    principal_id: UUID | None = None,
    request_id: str | None = None,
    source_ip: str | None = None,
) -> None:
    """Audit one upload (an HTTP request, a C-STORE association, an import run): one row per
    study it touched, whatever their number.

    One row per study, not one row listing them: ``resource_id`` stays one study id, so a
    study's trail (``query(resource_id=...)``) finds every upload of it, and the row stays
    within the btree limit of the ``audit_log_resource`` index (2704 bytes), which a list of
    a hundred ids passed (#24). The rows of one upload share ``request_id``; each row's
    detail holds the upload's own ``detail``, how many ``studies`` it touched and this
    study's ``instances`` by outcome (``accepted``, ``duplicate``, ``rejected``). A study is
    ``ok`` when any of its instances is stored. An upload that reached no study (everything
    refused before a study was known) has one row without ``resource_id``, ``rejected``.
    """
    rows: list[tuple[str | None, str, dict[str, Any]]] = [
        (
            str(study_id),
            "ok" if any(counts.get(o) for o in STORED_OUTCOMES) else "rejected",
            {**detail, "studies": len(studies), "instances": dict(counts)},
        )
        for study_id, counts in studies.items()
    ] or [(None, "rejected", {**detail, "studies": 0})]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_log (tenant_id, principal_id, principal, action, resource_type,"
            " resource_id, outcome, request_id, source_ip, detail)"
            " VALUES (%s, %s, %s, %s, 'study', %s, %s, %s, %s, %s)",
            [
                (
                    tenant_id,
                    principal_id,
                    principal,
                    action,
                    resource_id,
                    outcome,
                    request_id,
                    source_ip,
                    Jsonb(row_detail),
                )
                for resource_id, outcome, row_detail in rows
            ],
        )


def tally(outcomes: Iterable[tuple[UUID | None, str]]) -> dict[UUID, dict[str, int]]:
    """Per study, its files by outcome, from (study id, outcome) pairs; files without a study
    are left out (the upload's own counts hold them)."""
    out: dict[UUID, dict[str, int]] = {}
    for study_id, outcome in outcomes:
        if study_id is not None:
            counts = out.setdefault(study_id, {})
            counts[outcome] = counts.get(outcome, 0) + 1
    return out


# The chain's first prev_hash (no row before it).
GENESIS_HASH = "0" * 64
# Rows fetched per round trip while verifying a long chain.
VERIFY_BATCH = 5000
# Most rows one audit query returns.
QUERY_LIMIT_MAX = 1000


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows: int
    problem: str | None = None
    seq: int | None = None
    row_id: int | None = None


def verify(conn: Connection) -> VerifyResult:
    """Recompute every row's hash and check the links; name the first bad row.

    The canonical text comes from SQL's ``audit_canonical`` (jsonb's own rendering, so numbers
    and key order match exactly); the hashing and linking are checked here.

    Detects an edited row (its hash no longer matches), a deleted row (a gap in ``seq`` or a
    broken ``prev_hash`` link) and a re-ordered chain.
    """
    expected_prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    last_seq = 0
    with conn.cursor(row_factory=dict_row) as cur:
        while True:
            rows = cur.execute(
                "SELECT a.seq, a.id, a.prev_hash, a.row_hash, audit_canonical(a) AS canonical"
                " FROM audit_log a WHERE a.seq > %s ORDER BY a.seq LIMIT %s",
                (last_seq, VERIFY_BATCH),
            ).fetchall()
            if not rows:
                break
            for row in rows:
                seq, rid = int(row["seq"]), int(row["id"])
                if seq != expected_seq:
                    return VerifyResult(
                        False, count, f"gap: rows {expected_seq}..{seq - 1} missing", seq, rid
                    )
                if row["prev_hash"] != expected_prev:
                    return VerifyResult(
                        False, count, "broken link: prev_hash differs from the row before", seq, rid
                    )
                digest = hashlib.sha256((row["canonical"] + row["prev_hash"]).encode()).hexdigest()
                if digest != row["row_hash"]:
                    return VerifyResult(False, count, "edited: row_hash does not match", seq, rid)
                expected_prev = row["row_hash"]
                expected_seq += 1
                count += 1
                last_seq = seq
    return VerifyResult(True, count)


def query(
    conn: Connection,
    *,
    tenant_id: UUID | None = None,
    principal: str | None = None,
    action: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Filtered, newest-first page of audit rows and the total matching."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("tenant_id", tenant_id),
        ("principal", principal),
        ("action", action),
        ("resource_type", resource_type),
        ("resource_id", resource_id),
        ("outcome", outcome),
    ):
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    if since is not None:
        clauses.append("at >= %s")
        params.append(since)
    if until is not None:
        clauses.append("at < %s")
        params.append(until)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    limit = max(1, min(limit, QUERY_LIMIT_MAX))
    with conn.cursor(row_factory=dict_row) as cur:
        total_row = cur.execute(f"SELECT count(*) AS n FROM audit_log{where}", params).fetchone()
        rows = cur.execute(
            "SELECT seq, id, at, tenant_id, principal_id, principal, action, resource_type,"
            " resource_id, outcome, request_id, source_ip, detail, row_hash"
            f" FROM audit_log{where} ORDER BY seq DESC LIMIT %s OFFSET %s",
            [*params, limit, offset],
        ).fetchall()
    return rows, int(total_row["n"]) if total_row else 0
