"""``medtriage models ...``: the ML engineer's rollout commands, straight on PostgreSQL + Triton."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import psycopg

from orchestrator.errors import MedtriageError
from orchestrator.inference import rollout, routing
from orchestrator.inference.model_control import TritonControl
from orchestrator.inference.specs import load_repository
from orchestrator.security.tls import GrpcTls
from orchestrator.settings import CliSettings
from orchestrator.store.db import upgrade
from orchestrator.triage import gate, review


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    cell = {c: [("-" if r[c] is None else str(r[c])) for r in rows] for c in cols}
    widths = {c: max(len(c), *(len(v) for v in cell[c])) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    for i in range(len(rows)):
        lines.append("  ".join(cell[c][i].ljust(widths[c]) for c in cols))
    return "\n".join(lines)


def list_models(
    conn: psycopg.Connection, settings: CliSettings, control: TritonControl | None
) -> list[dict[str, Any]]:
    repo = load_repository(settings.model_repository)
    routing.sync_versions(conn, {m: s.versions for m, s in repo.items()})
    rows = []
    for model, spec in sorted(repo.items()):
        loaded = control.loaded_versions(model) if control else set()
        routes = {r.version: r for r in routing.load_routes(conn, model)}
        for version in spec.versions:
            r = routes.get(version)
            rows.append(
                {
                    "model": model,
                    "version": version,
                    "loaded": "yes" if version in loaded else "no",
                    "weight": r.weight if r and not r.shadow else 0,
                    "shadow": "yes" if r and r.shadow else "no",
                }
            )
    return rows


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    upgrade(settings.database_url)
    control = TritonControl(settings.triton_grpc_url, tls=GrpcTls.from_settings(settings))
    try:
        with psycopg.connect(settings.database_url) as conn:
            return _dispatch(args, settings, conn, control)
    except MedtriageError as exc:
        print(f"error: {exc.message}")
        return 2
    finally:
        control.close()


def _dispatch(
    args: argparse.Namespace,
    settings: CliSettings,
    conn: psycopg.Connection,
    control: TritonControl,
) -> int:
    action = args.models_action
    if action == "list":
        print(table(list_models(conn, settings, control)))
    elif action == "load":
        print(f"{args.model}: loaded {sorted(control.load(args.model, args.version))}")
        rollout._event(conn, args.model, "load", _actor(), [], [], {"version": args.version})
    elif action == "unload":
        routed = rollout.routed_to(args.model, args.version, routing.load_routes(conn, args.model))
        if routed:
            print(
                f"{args.model} v{args.version} is still routed ({'; '.join(routed)}): move the"
                " routes away first (`medtriage models route`, `medtriage models shadow remove`)",
                file=sys.stderr,
            )
            return 2
        loaded = control.unload(args.model, args.version)
        rollout._event(conn, args.model, "unload", _actor(), [], [], {"version": args.version})
        print(f"{args.model}: loaded {sorted(loaded)}")
    elif action == "route":
        routes = rollout.set_weights(
            conn,
            args.model,
            rollout.parse_weights(args.weights),
            actor=_actor(),
            loaded=control.loaded_versions(args.model),
        )
        print(table([asdict(r) for r in routes]))
    elif action == "shadow":
        fn = rollout.add_shadow if args.shadow_action == "add" else rollout.remove_shadow
        print(table([asdict(r) for r in fn(conn, args.model, args.version, actor=_actor())]))
    elif action == "compare":
        stats = rollout.compare(conn, args.model, args.versions)
        reviewed = review.figures_by_version(conn, args.model)
        empty = dict.fromkeys(review.FIGURES)
        print(table([{**asdict(s), **reviewed.get(s.version, empty)} for s in stats]))
    elif action == "gate":
        rollout.set_gate(
            conn,
            args.model,
            rollout.Gate(args.min_results, args.min_agreement, args.max_review_share),
        )
        print(asdict(rollout.get_gate(conn, args.model)))
    elif action == "promote":
        routes = rollout.promote(
            conn,
            args.model,
            args.version,
            actor=_actor(),
            force=args.force,
            loaded=control.loaded_versions(args.model),
        )
        print(table([asdict(r) for r in routes]))
    elif action == "rollback":
        print(table([asdict(r) for r in rollout.rollback(conn, args.model, actor=_actor())]))
    elif action == "thresholds":
        _thresholds(args, settings, conn)
    return 0


def _thresholds(args: argparse.Namespace, settings: CliSettings, conn: psycopg.Connection) -> None:
    """Show the model's gate thresholds; with any value given, set them for --version first
    (values not given keep what applies to that version now)."""
    spec = load_repository(settings.model_repository).get(args.model)
    if spec is None:
        raise MedtriageError(f"no model {args.model!r} in the repository")
    given = (args.min_confidence, args.max_entropy, args.critical_probability)
    if any(v is not None for v in given):
        now = gate.thresholds(conn, args.model, args.version, settings.review_confidence_threshold)
        gate.set_thresholds(
            conn,
            args.model,
            args.version,
            gate.Thresholds(
                now.min_confidence if args.min_confidence is None else args.min_confidence,
                now.max_entropy if args.max_entropy is None else args.max_entropy,
                now.critical_probability
                if args.critical_probability is None
                else args.critical_probability,
            ),
            actor=_actor(),
        )
    rows = gate.effective_thresholds(conn, spec, settings.review_confidence_threshold)
    print(table(rows) if not args.json else json.dumps(rows, indent=2))


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="model versions, traffic split, shadows, promotion")
    msub = models.add_subparsers(dest="models_action", required=True)
    msub.add_parser("list", help="versions, loaded state, weights")
    for name in ("load", "unload"):
        p = msub.add_parser(name, help=f"{name} one version in Triton")
        p.add_argument("model")
        p.add_argument("version", type=int)
    p = msub.add_parser("route", help="set the live split, e.g. `route triage 1=90 2=10`")
    p.add_argument("model")
    p.add_argument("weights", nargs="+")
    p = msub.add_parser("shadow", help="`shadow add triage 3` / `shadow remove triage 3`")
    p.add_argument("shadow_action", choices=["add", "remove"])
    p.add_argument("model")
    p.add_argument("version", type=int)
    p = msub.add_parser("compare", help="side-by-side figures per version")
    p.add_argument("model")
    p.add_argument("versions", type=int, nargs="+")
    p = msub.add_parser("gate", help="set the promotion gate of a model")
    p.add_argument("model")
    p.add_argument("--min-results", type=int, default=rollout.Gate.min_results)
    p.add_argument("--min-agreement", type=float, default=rollout.Gate.min_agreement)
    p.add_argument("--max-review-share", type=float, default=rollout.Gate.max_review_share)
    p = msub.add_parser("promote", help="send 100 %% to a version if its gate passes")
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--force", action="store_true")
    p = msub.add_parser("rollback", help="restore the split before the last change")
    p.add_argument("model")
    p = msub.add_parser(
        "thresholds",
        help="the effective gate values per version and where each came from (confidence,"
        " entropy, operating point, OOD); set the confidence ones with the options",
    )
    p.add_argument("model")
    p.add_argument("--version", type=int, default=0, help="0 = the model's default")
    p.add_argument("--min-confidence", type=float)
    p.add_argument("--max-entropy", type=float)
    p.add_argument("--critical-probability", type=float)
    p.add_argument("--json", action="store_true", help="the effective values as JSON")
    models.set_defaults(func=run)
