"""``medtriage keys list|revoke``, ``audit verify|query``, ``purge``, ``legal-hold
set|release|list``, ``deid``, ``break-glass``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.settings import CliSettings


def _connect(settings: CliSettings) -> Any:
    import psycopg

    from orchestrator.store.db import upgrade

    upgrade(settings.database_url)
    return psycopg.connect(settings.database_url)


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _cmd_keys_list(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.store.db.keys import list_keys

    with _connect(settings) as conn:
        rows = list_keys(conn, tenant=args.tenant)
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        expires = row["expires_at"].isoformat() if row["expires_at"] else "never"
        print(
            f"{row['id']}  mt_{row['prefix']}_…  {row['role']:<11} {row['tenant']:<16}"
            f" {row['name']:<20} {state:<8} expires {expires}"
        )
    return 0


def _cmd_keys_revoke(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.store.db.audit import record
    from orchestrator.store.db.keys import revoke_key

    with _connect(settings) as conn:
        done = revoke_key(conn, args.key)
        record(
            conn,
            principal="cli",
            action="key.revoke",
            resource_type="api_key",
            resource_id=args.key,
            outcome="ok" if done else "not_found",
        )
    print("revoked" if done else "no live key with that id or prefix", file=sys.stderr)
    return 0 if done else 1


def _store(settings: CliSettings) -> Any:
    from orchestrator.store.objects import open_store

    return open_store(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        encryption_keys=settings.storage_encryption_keys,
        s3_sse=settings.s3_sse,
        s3_kms_key_id=settings.s3_kms_key_id,
    )


def _cmd_audit_verify(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.security import anchors
    from orchestrator.store.db.audit import verify

    with _connect(settings) as conn:
        result = verify(conn)
        if not result.ok:
            print(
                f"AUDIT CHAIN BROKEN at seq {result.seq} (row id {result.row_id}):"
                f" {result.problem}; {result.rows} rows verified before it"
            )
            return 2
        if not settings.audit_anchor_key:
            print(
                f"audit chain intact: {result.rows} rows (anchors not checked:"
                f" {anchors.KEY_SETTING} is not set)"
            )
            return 0
        check = anchors.verify(conn, _store(settings), settings.audit_anchor_key)
    if not check.ok:
        print(f"AUDIT CHAIN BROKEN: {check.problem}; {check.anchors} anchors agreed before it")
        return 2
    print(f"audit chain intact: {result.rows} rows, {check.anchors} anchors agree")
    return 0


def _cmd_audit_anchor(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.security import anchors

    if not settings.audit_anchor_key:
        print(f"set {anchors.KEY_SETTING} (kept outside the database)", file=sys.stderr)
        return 1
    with _connect(settings) as conn:
        anchor = anchors.write(conn, _store(settings), settings.audit_anchor_key)
    print(f"anchor {anchor.n}: seq {anchor.seq}" if anchor else "nothing new to anchor")
    return 0


def _cmd_audit_query(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.store.db.audit import query

    with _connect(settings) as conn:
        tenant_id = None
        if args.tenant:
            row = conn.execute("SELECT id FROM tenants WHERE name = %s", (args.tenant,)).fetchone()
            if row is None:
                print(f"no tenant {args.tenant!r}", file=sys.stderr)
                return 1
            tenant_id = row[0]
        rows, total = query(
            conn,
            tenant_id=tenant_id,
            principal=args.principal,
            action=args.action_name,
            resource_id=args.resource_id,
            outcome=args.outcome,
            since=datetime.fromisoformat(args.since) if args.since else None,
            limit=args.limit,
            offset=args.offset,
        )
    for row in rows:
        print(json.dumps(row, default=_json_default))
    print(f"{len(rows)} of {total}", file=sys.stderr)
    return 0


def _cmd_purge(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.privacy import retention

    report = retention.purge_from_settings(settings, dry_run=args.dry_run)
    print(json.dumps(report.summary()))
    return 0


def _cmd_retention_set(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.privacy import retention

    with _connect(settings) as conn:
        retention.set_policy(conn, args.tenant, args.kind, retention.parse_age(args.max_age))
    print(f"{args.tenant}: {args.kind} kept {args.max_age}")
    return 0


def _cmd_legal_hold(args: argparse.Namespace, settings: CliSettings) -> int:
    from uuid import UUID

    from orchestrator.errors import MedtriageError
    from orchestrator.privacy import legal_hold

    actor = legal_hold.Actor(name=f"cli:{args.by}")
    change = legal_hold.hold if args.action == "set" else legal_hold.release
    try:
        study_id = UUID(args.study_id)
    except ValueError:
        print(f"not a study id: {args.study_id!r}", file=sys.stderr)
        return 1
    with _connect(settings) as conn:
        try:
            row = change(conn, study_id, reason=args.reason, actor=actor)
        except MedtriageError as exc:
            print(exc.message, file=sys.stderr)
            return 1
    print(json.dumps(row))
    return 0


def _cmd_legal_hold_list(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.privacy import legal_hold

    with _connect(settings) as conn:
        tenant_id = None
        if args.tenant:
            row = conn.execute("SELECT id FROM tenants WHERE name = %s", (args.tenant,)).fetchone()
            if row is None:
                print(f"no tenant {args.tenant!r}", file=sys.stderr)
                return 1
            tenant_id = row[0]
        rows, total = legal_hold.held(conn, tenant_id=tenant_id, limit=args.limit)
    for item in rows:
        print(json.dumps(item))
    print(f"{len(rows)} of {total} held", file=sys.stderr)
    return 0


def _cmd_deid(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.privacy import deid

    result = deid.deidentify_path(Path(args.input), Path(args.output))
    print(json.dumps(result.summary()))
    return 0


def add_key_commands(keys: Any) -> None:
    """Add ``list`` and ``revoke`` to the existing ``keys`` sub-parsers."""
    lst = keys.add_parser("list", help="list keys (never the secrets)")
    lst.add_argument("--tenant", default=None)
    lst.set_defaults(func=_cmd_keys_list)
    rev = keys.add_parser("revoke", help="revoke a key by id or prefix")
    rev.add_argument("key")
    rev.set_defaults(func=_cmd_keys_revoke)


def add_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True
    )
    audit.add_parser(
        "verify", help="check the hash chain and its anchors; exit 2 naming the bad row"
    ).set_defaults(func=_cmd_audit_verify)
    audit.add_parser(
        "anchor", help="anchor the chain's head in the object store (HMAC-keyed) now"
    ).set_defaults(func=_cmd_audit_anchor)
    q = audit.add_parser("query", help="print audit rows as JSON lines, newest first")
    q.add_argument("--tenant", default=None)
    q.add_argument("--principal", default=None)
    q.add_argument("--action", dest="action_name", default=None)
    q.add_argument("--resource-id", default=None)
    q.add_argument("--outcome", default=None)
    q.add_argument("--since", default=None, help="ISO time")
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--offset", type=int, default=0)
    q.set_defaults(func=_cmd_audit_query)

    purge = sub.add_parser("purge", help="delete data past each tenant's retention policy")
    purge.add_argument("--dry-run", action="store_true")
    purge.set_defaults(func=_cmd_purge)

    ret = sub.add_parser("retention", help="per-tenant retention policies").add_subparsers(
        dest="action", required=True
    )
    rset = ret.add_parser("set", help="keep KIND of TENANT for MAX_AGE (e.g. 3650d)")
    rset.add_argument("tenant")
    rset.add_argument("kind", choices=["originals", "previews", "reports", "results"])
    rset.add_argument("max_age")
    rset.set_defaults(func=_cmd_retention_set)

    hold = sub.add_parser(
        "legal-hold", help="keep studies whatever the retention policies say"
    ).add_subparsers(dest="action", required=True)
    for name, what in (("set", "put a study on hold"), ("release", "take a study off hold")):
        p = hold.add_parser(name, help=f"{what} (audited, with the reason)")
        p.add_argument("study_id")
        p.add_argument("--reason", required=True, help="why (e.g. the matter it is kept for)")
        p.add_argument("--by", required=True, help="who asks (written to the audit trail)")
        p.set_defaults(func=_cmd_legal_hold)
    hl = hold.add_parser("list", help="held studies as JSON lines, newest hold first")
    hl.add_argument("--tenant", default=None)
    hl.add_argument("--limit", type=int, default=100)
    hl.set_defaults(func=_cmd_legal_hold_list)

    deid = sub.add_parser("deid", help="de-identify DICOM (PS3.15 Annex E basic profile)")
    deid.add_argument("input", help="a DICOM file or a folder")
    deid.add_argument("output", help="output file or folder")
    deid.set_defaults(func=_cmd_deid)
