"""``medtriage import PATH`` (batch import) and ``medtriage dimse`` (C-STORE receiver)."""

from __future__ import annotations

import argparse
import io
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from orchestrator.settings import CliSettings


def _services(settings: CliSettings) -> tuple[Any, Any, Any]:
    from orchestrator.queue import jobs as jobqueue
    from orchestrator.store.db import connect_pool, upgrade
    from orchestrator.store.objects import open_store

    upgrade(settings.database_url)
    pool = connect_pool(settings.database_url, min_size=1, max_size=2)
    pool.wait()
    store = open_store(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        encryption_keys=settings.storage_encryption_keys,
        s3_sse=settings.s3_sse,
        s3_kms_key_id=settings.s3_kms_key_id,
    )
    return pool, store, jobqueue.connect(settings.redis_url)


def _cmd_import(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.ingest import importer

    root = Path(args.path)
    if not root.exists():
        print(f"medtriage import: {root}: no such file or folder", file=sys.stderr)
        return 2
    # pydicom warns about every odd file; the summary already says what was wrong with each.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
    pool, store, redis = _services(settings)
    try:
        summary = importer.run(
            pool,
            store,
            redis,
            settings.queue_name,
            root=root,
            tenant=args.tenant,
            max_pixels=settings.max_pixels,
            max_bytes=settings.max_upload_bytes,
            job_timeout_s=settings.job_timeout_s,
            priority=args.priority,
            progress=io.StringIO() if args.quiet else sys.stderr,
        )
    finally:
        pool.close()
        redis.close()
    print(summary.text())
    # 1 tells scripts that some files need attention; everything else is stored.
    return 1 if summary.rejected else 0


def _cmd_dimse(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.ingest.arrivals import Sweeper
    from orchestrator.ingest.dimse import StoreSCP

    pool, store, redis = _services(settings)
    scp = StoreSCP(
        pool,
        store,
        redis,
        settings.queue_name,
        tenant=args.tenant or settings.dimse_tenant,
        ae_title=args.ae_title or settings.dimse_ae_title,
        max_pixels=settings.max_pixels,
        job_timeout_s=settings.job_timeout_s,
        max_queue_depth=settings.max_queue_depth,
        max_queue_age_s=settings.max_queue_age_s,
        calling_aets=tuple(a.strip() for a in settings.dimse_calling_aets.split(",") if a.strip()),
        release_completes=settings.dimse_release_completes,
    )
    sweeper = Sweeper(
        pool,
        redis,
        settings.queue_name,
        stable_age_s=settings.ingest_stable_age_s,
        job_timeout_s=settings.job_timeout_s,
    ).start()
    host = settings.dimse_host
    port = settings.dimse_port if args.port is None else args.port
    server = scp.start(host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"C-STORE SCP {scp.ae_title} listening on {host}:{port}", flush=True)
    stop.wait()
    server.shutdown()
    sweeper.stop()
    pool.close()
    redis.close()
    return 0


def add_parser(sub: Any) -> None:
    dimse = sub.add_parser("dimse", help="run the DIMSE C-STORE / C-ECHO receiver")
    dimse.add_argument("--ae-title", default=None, help="default: MEDTRIAGE_DIMSE_AE_TITLE")
    dimse.add_argument("--port", type=int, default=None, help="default: MEDTRIAGE_DIMSE_PORT")
    dimse.add_argument("--tenant", default=None, help="default: MEDTRIAGE_DIMSE_TENANT")
    dimse.set_defaults(func=_cmd_dimse)
    imp = sub.add_parser(
        "import",
        help="import a folder tree or zip of DICOM files (resumable: stored files are skipped)",
    )
    imp.add_argument(
        "path", help="a folder (searched recursively; zips inside are opened) or a zip"
    )
    imp.add_argument("--tenant", default="default", help="tenant the studies belong to")
    imp.add_argument("--priority", choices=["stat", "routine"], default=None)
    imp.add_argument("--quiet", action="store_true", help="no progress output")
    imp.set_defaults(func=_cmd_import)
