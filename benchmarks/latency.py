"""Latency under load for one workload, repeated: idle single-study latency, then p50/p95/p99
upload→done at 50 % of the saturation just measured, and p95 at half load ÷ idle (goal ≤ 3),
for several rounds, optionally beside other settings (runs alternated).

    .venv/bin/python -m benchmarks.latency --workload rx-2048x2500-16bit --rounds 3 \
        --compare MEDTRIAGE_DECODE_ISOLATION_UNCOMPRESSED=true

``benchmarks.e2e`` measures this once per workload, from 60 studies, so its p95 rests on the
three slowest: one hiccup of a shared machine moves it. This repeats the measure so a change
in the ratio can be told from noise. Writes ``benchmarks/results/latency-<workload>-<date>.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.e2e import (
    RESULTS,
    _corpus,
    _environ,
    _pct,
    _post,
    _restudied,
    _wait,
    bench_stack,
    open_loop,
    saturation,
    workloads,
)
from orchestrator.settings import REPO_ROOT

SATURATION_STUDIES = 40
IDLE_STUDIES = 5
HALF_LOAD_STUDIES = 60


def one_round(home: Path, workload: str, workers: int, env: dict[str, str]) -> dict[str, float]:
    """A fresh stack: saturation, idle latency, latencies at half of that saturation."""
    files = _corpus(workloads()[workload], SATURATION_STUDIES + IDLE_STUDIES + HALF_LOAD_STUDIES)
    with _environ(env), bench_stack(home, workers) as (_, db_url, client):
        sat, _ = saturation(client, db_url, files[:SATURATION_STUDIES])
        idle = []
        for f in files[SATURATION_STUDIES : SATURATION_STUDIES + IDLE_STUDIES]:
            idle += [r[1] - r[0] for r in _wait(db_url, [_post(client, [_restudied(f)])])]
        half = open_loop(client, db_url, files[SATURATION_STUDIES + IDLE_STUDIES :], rate=sat / 2)
    idle_med = statistics.median(idle)
    out = {"saturation": sat, "idle": idle_med}
    out.update({f"p{q}": _pct(half, q) for q in (50, 95, 99)})
    out["ratio"] = out["p95"] / idle_med
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="rx-2048x2500-16bit", choices=sorted(workloads()))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--compare", action="append", default=[], help="NAME=VALUE settings of a second arm"
    )
    args = ap.parse_args()
    home = Path(os.environ.get("MEDTRIAGE_HOME", str(REPO_ROOT / ".medtriage")))
    arms = {"as committed": {}}
    if args.compare:
        arms[" ".join(args.compare)] = dict(c.split("=", 1) for c in args.compare)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in arms}
    for i in range(args.rounds):
        for label, env in arms.items():
            r = one_round(home, args.workload, args.workers, env)
            runs[label].append(r)
            print(
                f"{label} | round {i + 1}: {r['saturation']:.1f} img/s, idle {r['idle']:.3f} s,"
                f" half load p95 {r['p95']:.3f} s, ratio {r['ratio']:.2f}",
                flush=True,
            )
    lines = [
        f"# Latency under load: {args.workload}, {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        f"`python -m benchmarks.latency --workload {args.workload} --rounds {args.rounds}"
        + "".join(f" --compare {c}" for c in args.compare)
        + f"`; {args.workers} workers, {os.cpu_count()} cores, {HALF_LOAD_STUDIES} studies at"
        " half load per round, runs alternated. Medians (all rounds in brackets).",
        "",
        "| settings | saturation img/s | idle s | half load p50 / p95 / p99 s | p95 ÷ idle (≤ 3) |",
        "|---|---|---|---|---|",
    ]

    def cell(rs: list[dict[str, float]], key: str, fmt: str) -> str:
        values = [r[key] for r in rs]
        return f"{statistics.median(values):{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"

    for label, rs in runs.items():
        lines.append(
            f"| {label} | {cell(rs, 'saturation', '.1f')} | {cell(rs, 'idle', '.3f')} | "
            + " / ".join(
                f"{statistics.median(r[q] for r in rs):.3f}" for q in ("p50", "p95", "p99")
            )
            + f" | {cell(rs, 'ratio', '.2f')} |"
        )
    out = RESULTS / f"latency-{args.workload}-{datetime.now(UTC).date()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
