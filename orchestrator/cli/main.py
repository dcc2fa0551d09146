"""``medtriage`` command line: run the parts, manage keys and the database, run the demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from pydantic import ValidationError

from orchestrator.privacy import logfilter
from orchestrator.settings import ApiSettings, CliSettings, WorkerSettings

# The application role's database password, when set by `medtriage db app-login`.
APP_PASSWORD_MIN_CHARS = 16


def _cmd_db_upgrade(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.store.db import upgrade

    applied = upgrade(settings.database_url)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def _cmd_db_app_login(args: argparse.Namespace, settings: CliSettings) -> int:
    """Let ``medtriage_app`` (made NOLOGIN by migration 0006) log in with the password in
    $MEDTRIAGE_APP_DB_PASSWORD; run as the owner, after `db upgrade`."""
    import os

    import psycopg
    from psycopg import sql

    password = os.environ.get("MEDTRIAGE_APP_DB_PASSWORD", "")
    if len(password) < APP_PASSWORD_MIN_CHARS:
        print(
            f"set MEDTRIAGE_APP_DB_PASSWORD (at least {APP_PASSWORD_MIN_CHARS} characters)",
            file=sys.stderr,
        )
        return 1
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE medtriage_app LOGIN PASSWORD {}").format(sql.Literal(password))
        )
    print("medtriage_app may log in; point the API and workers at it")
    return 0


def _cmd_keys_create(args: argparse.Namespace, settings: CliSettings) -> int:
    import psycopg

    from orchestrator.store.db import upgrade
    from orchestrator.store.db.keys import (
        PLATFORM_ROLES,
        PLATFORM_TENANT,
        create_key,
        parse_duration,
    )

    if args.tenant is None:
        args.tenant = PLATFORM_TENANT if args.role in PLATFORM_ROLES else "default"
    upgrade(settings.database_url)
    with psycopg.connect(settings.database_url) as conn:
        key_id, key = create_key(
            conn,
            tenant=args.tenant,
            name=args.name or args.role,
            role=args.role,
            expires_in=parse_duration(args.expires_in) if args.expires_in else None,
        )
    print(key if args.quiet else f"key id {key_id}, role {args.role}, tenant {args.tenant}\n{key}")
    print("(shown once; store it now)", file=sys.stderr)
    return 0


def _cmd_api(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.api import create_app
    from orchestrator.security import tls

    api_settings = ApiSettings()
    tls.serve(
        create_app(api_settings),
        host=api_settings.host,
        port=api_settings.port,
        certfile=api_settings.tls_certfile,
        keyfile=api_settings.tls_keyfile,
    )
    return 0


def _cmd_worker(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.queue import worker

    worker_settings = WorkerSettings()
    if args.burst:
        worker.run_one(worker_settings, burst=True)
        return 0
    return worker.run(worker_settings)


def _cmd_triton(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator.inference.local_triton.install import install_runtime
    from orchestrator.inference.local_triton.process import TritonProcess
    from orchestrator.inference.local_triton.render import render_repository
    from orchestrator.inference.specs import load_repository

    if args.action == "install":
        print(install_runtime(settings.home))
        return 0
    stack_home = settings.home
    rendered = render_repository(
        settings.model_repository,
        stack_home / "triton-repository",
        dynamic_batching=settings.triton_local_dynamic_batching,
    )
    grpc_port = int(settings.triton_grpc_url.rsplit(":", 1)[1])
    http_port = int(settings.triton_http_url.rsplit(":", 1)[1].split("/")[0])
    install_runtime(stack_home)
    proc = TritonProcess(
        stack_home,
        rendered,
        stack_home / "logs" / "triton.log",
        grpc_port=grpc_port,
        http_port=http_port,
        model_control="explicit",
        load_models=sorted(load_repository(settings.model_repository)),
    )
    # SIGTERM would end this process without stopping the server (its own session), and a
    # shell starts a background job with SIGINT ignored: both now stop and wait for it.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with proc:
            print(f"Triton ready: grpc {proc.grpc_url}, http {proc.http_url}; Ctrl-C to stop")
            while proc.is_running:
                time.sleep(TRITON_POLL_S)
    except _Stop:
        pass  # ``with proc`` stopped the server (SIGTERM, then the group killed) and waited
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# How often `medtriage triton serve` checks that its server still runs.
TRITON_POLL_S = 1.0


class _Stop(Exception):
    """SIGTERM or SIGINT reached `medtriage triton serve`."""


def _raise_stop(signum: int, _frame: object) -> None:
    # One stop is enough: a second signal must not interrupt the server's shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def _cmd_demo(args: argparse.Namespace, settings: CliSettings) -> int:
    from orchestrator import demo

    return demo.main(settings, workers=args.workers, out=args.out)


def _cmd_drift(args: argparse.Namespace, settings: CliSettings) -> int:
    from pathlib import Path

    from orchestrator.cli import drift as drift_plot
    from orchestrator.inference.specs import load_repository

    versions = load_repository(settings.model_repository)[args.model].versions
    version = args.version if args.version is not None else max(versions)
    out = Path(args.out or f"drift-{args.model}-v{version}.png")
    result = drift_plot.render(
        settings.database_url, settings.model_repository, args.model, version, args.window, out
    )
    stats = "too few live results" if result is None else f"PSI {result.psi:.3f} JS {result.js:.3f}"
    print(f"{out}: {args.model} v{version}, {stats}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtriage", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply pending migrations").set_defaults(func=_cmd_db_upgrade)
    db.add_parser(
        "app-login", help="let medtriage_app log in ($MEDTRIAGE_APP_DB_PASSWORD); as the owner"
    ).set_defaults(func=_cmd_db_app_login)

    from orchestrator.store.db.keys import PLATFORM_TENANT, ROLES

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--role", required=True, choices=list(ROLES))
    create.add_argument(
        "--tenant",
        default=None,
        help=f"default: 'default', or '{PLATFORM_TENANT}' for the platform-* roles",
    )
    create.add_argument("--name", default=None)
    create.add_argument("--quiet", action="store_true", help="print only the key")
    create.add_argument("--expires-in", default=None, help="e.g. 90d, 12h (default: never)")
    create.set_defaults(func=_cmd_keys_create)
    from orchestrator.cli import security as security_cli

    security_cli.add_key_commands(keys)
    security_cli.add_parser(sub)

    sub.add_parser("api", help="run the HTTP API").set_defaults(func=_cmd_api)
    worker = sub.add_parser("worker", help="run RQ worker process(es)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_cmd_worker)

    triton = sub.add_parser("triton", help="the local Triton server (bundled binary)")
    triton.add_argument("action", choices=["install", "serve"])
    triton.set_defaults(func=_cmd_triton)

    demo = sub.add_parser("demo", help="start the local stack and process the sample studies")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--out", default=None, help="folder for reports (default <home>/demo)")
    demo.set_defaults(func=_cmd_demo)
    drift = sub.add_parser("drift", help="plot a model version's live confidence vs reference")
    drift.add_argument("model")
    drift.add_argument("--version", type=int, default=None, help="default: the newest")
    drift.add_argument("--window", type=int, default=1000, help="newest N live results")
    drift.add_argument("--out", default=None, help="PNG path (default drift-MODEL-vN.png)")
    drift.set_defaults(func=_cmd_drift)
    from orchestrator.cli import models as models_cli

    models_cli.add_parser(sub)
    from orchestrator.cli import ops as ops_cli

    ops_cli.add_parser(sub)
    from orchestrator.cli import ingest as ingest_cli

    ingest_cli.add_parser(sub)
    from orchestrator.cli import services as services_cli

    services_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logfilter.install()  # pydicom's warnings quote tag values: never into our logs
    try:
        settings = CliSettings()
    except ValidationError as exc:
        # A refused configuration (e.g. storage keys kept with the data): say what, no traceback.
        for error in exc.errors():
            print(f"medtriage: settings refused: {error['msg']}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    return int(args.func(args, settings))


# Exit status when the settings are refused at start.
EXIT_BAD_SETTINGS = 2


if __name__ == "__main__":
    sys.exit(main())
