"""``medtriage reconcile`` / ``dead-letters`` / ``requeue``: the reliability commands."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from uuid import UUID


def _services(settings: Any) -> tuple[Any, Any]:
    from orchestrator.queue import jobs as jobqueue
    from orchestrator.store.db import connect_pool, upgrade

    upgrade(settings.database_url)
    pool = connect_pool(settings.database_url, min_size=1, max_size=2)
    pool.wait()
    return pool, jobqueue.connect(settings.redis_url)


def _cmd_reconcile(args: argparse.Namespace, settings: Any) -> int:
    from orchestrator.queue import reconcile

    pool, redis = _services(settings)
    try:
        while True:
            result = reconcile.reconcile_once(pool, redis, settings)
            print(json.dumps(result.public()), flush=True)
            if not args.loop:
                return 0
            time.sleep(settings.reconcile_interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        pool.close()


def _cmd_dead_letters(args: argparse.Namespace, settings: Any) -> int:
    from orchestrator.queue import deadletter

    pool, _ = _services(settings)
    try:
        with pool.connection() as conn:
            rows, total = deadletter.list_items(conn, limit=args.limit)
    finally:
        pool.close()
    for row in rows:
        print(
            f"{row.study_id}  attempts={row.attempts}  {row.created_at:%Y-%m-%d %H:%M:%S}"
            f"  {row.reason}"
        )
    print(f"{total} dead letter(s)")
    return 0


def _cmd_requeue(args: argparse.Namespace, settings: Any) -> int:
    from orchestrator.queue import deadletter

    if not args.all and not args.study_ids:
        print("name the studies to requeue, or pass --all")
        return 2
    pool, redis = _services(settings)
    try:
        ids = deadletter.requeue(
            pool,
            redis,
            settings.queue_name,
            None if args.all else [UUID(s) for s in args.study_ids],
            job_timeout_s=settings.job_timeout_s,
        )
    finally:
        pool.close()
    for study_id in ids:
        print(f"requeued {study_id}")
    print(f"{len(ids)} requeued")
    return 0


def add_parser(sub: Any) -> None:
    rec = sub.add_parser("reconcile", help="requeue open studies whose job is gone or abandoned")
    rec.add_argument("--loop", action="store_true", help="repeat every reconcile_interval_s")
    rec.set_defaults(func=_cmd_reconcile)
    dl = sub.add_parser("dead-letters", help="list studies the platform stopped retrying")
    dl.add_argument("--limit", type=int, default=100)
    dl.set_defaults(func=_cmd_dead_letters)
    rq = sub.add_parser("requeue", help="send dead-lettered studies back to the queue")
    rq.add_argument("study_ids", nargs="*", metavar="STUDY_ID")
    rq.add_argument("--all", action="store_true", help="every dead letter")
    rq.set_defaults(func=_cmd_requeue)
