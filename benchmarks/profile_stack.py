"""Where the CPU goes per study: py-spy on the API and every worker during a saturation run,
plus PostgreSQL's own counters (transactions, rows) per study.

    .venv/bin/pip install py-spy
    .venv/bin/python -m benchmarks.profile_stack --studies 150 --images 1

Writes ``benchmarks/results/profile-<workload>-x<images per study>.md`` (self and inclusive time of the hottest
functions, per process kind) and the raw collapsed stacks beside it for flame graphs. py-spy
samples from outside the processes, so the run being profiled is unchanged.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg

from benchmarks.e2e import (
    RESULTS,
    _post,
    _service_pids,
    _wait,
    bench_stack,
    cpu_seconds,
    saturation_of,
    series_corpus,
    workloads,
)

PG_COUNTERS = ("xact_commit", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated")


def _pg_counters(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            f"SELECT {', '.join(PG_COUNTERS)} FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return dict(zip(PG_COUNTERS, (int(v) for v in row), strict=True))


def _stage_medians(db_url: str) -> dict[str, float]:
    """Median wall ms per pipeline stage, from what each worker recorded (studies.timings)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT key, percentile_cont(0.5) WITHIN GROUP (ORDER BY value::float)"
            " FROM studies, jsonb_each_text(timings) GROUP BY key ORDER BY key"
        ).fetchall()
        busy = conn.execute(
            "SELECT sum(extract(epoch FROM finished_at - started_at))"
            " / extract(epoch FROM max(finished_at) - min(started_at))"
            " FROM studies WHERE started_at IS NOT NULL"
        ).fetchone()
        workers = conn.execute("SELECT count(DISTINCT worker) FROM job_attempts").fetchone()
    out = {str(k): float(v) for k, v in rows}
    if busy and busy[0] and workers and workers[0]:
        out["share of time a worker holds a study"] = float(busy[0]) / int(workers[0])
    return out


def _top(
    collapsed: list[Path], n: int = 25
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(self, inclusive) sample counts per function over py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for path in collapsed:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            k = int(count)
            frames = [
                f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")"
                for f in stack.split(";")
            ]
            # Skip the process/thread header frames py-spy adds.
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += k
            own[frames[-1]] += k
            for f in set(frames):
                incl[f] += k
    return own.most_common(n), incl.most_common(n * 2), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="ct-512x512-16bit", choices=sorted(workloads()))
    ap.add_argument("--studies", type=int, default=150)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=1, help="images per study (one request each)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL (CPU)")
    ap.add_argument("--idle", action="store_true", help="wall clock: count waiting samples too")
    ap.add_argument("--no-spy", action="store_true", help="counters only, no sampling")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    studies = series_corpus(workloads()[args.workload], args.studies, args.images)
    work = Path(tempfile.mkdtemp(prefix="medtriage-profile-"))
    with bench_stack(work, args.workers) as (stack, db_url, client):
        _wait(db_url, [_post(client, s[:1]) for s in studies[:4]])  # warm every process first
        pids = {"api": [stack.procs[0].pid], "worker": [p.pid for p in stack.procs[1:]]}
        roles = {
            **pids,
            "triton": [stack.triton.pid or 0] if stack.triton else [],
            "postgresql": _service_pids("postgres"),
            "redis": _service_pids("redis-server"),
        }
        spies = []
        for role, role_pids in pids.items():
            for pid in role_pids if not args.no_spy else []:
                out = work / f"{role}-{pid}.txt"
                spies.append(
                    (
                        role,
                        out,
                        subprocess.Popen(
                            [
                                spy,
                                "record",
                                "--pid",
                                str(pid),
                                "--rate",
                                str(args.rate),
                                "--format",
                                "raw",
                                "--output",
                                str(out),
                                "--nonblocking",
                                "--subprocesses",
                                *(["--gil"] if args.gil else []),
                                *(["--idle"] if args.idle else []),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        ),
                    )
                )
        time.sleep(1.0)
        pg0, cpu0, m0, t0 = (
            _pg_counters(db_url),
            cpu_seconds(roles),
            psutil.cpu_times(),
            time.monotonic(),
        )
        rate, _ = saturation_of(client, db_url, studies)
        pg1, cpu1, m1, t1 = (
            _pg_counters(db_url),
            cpu_seconds(roles),
            psutil.cpu_times(),
            time.monotonic(),
        )
        busy = (sum(m1) - m1.idle - m1.iowait) - (sum(m0) - m0.idle - m0.iowait)
        machine = busy / ((t1 - t0) * (psutil.cpu_count() or 1))
        stages = _stage_medians(db_url)
        for _, _, proc in spies:
            proc.send_signal(2)
        for _, _, proc in spies:
            proc.wait(timeout=30)
    n = len(studies) * args.images
    lines = [
        f"# Profile: {args.workload}, {len(studies)} studies of {args.images} image(s),"
        f" {args.workers} workers",
        "",
        f"saturation {rate:.1f} img/s; CPU ms per image: "
        + ", ".join(f"{r} {(cpu1[r] - cpu0[r]) / n * 1e3:.1f}" for r in roles),
        "",
        f"machine busy {machine:.0%} of all cores over the run (benchmark client included)",
        "",
        "worker stages, median wall ms per study: "
        + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()),
        "",
        "PostgreSQL per study: "
        + ", ".join(f"{k} {(pg1[k] - pg0[k]) / len(studies):.1f}" for k in PG_COUNTERS),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for role in pids:
        outs = [o for r, o, _ in spies if r == role]
        own, incl, total = _top(outs)
        lines += [f"## {role} ({total} samples)", "", "| self % | function |", "|---|---|"]
        lines += [f"| {c / total * 100:.1f} | `{f}` |" for f, c in own]
        lines += ["", "| inclusive % | function |", "|---|---|"]
        lines += [f"| {c / total * 100:.1f} | `{f}` |" for f, c in incl]
        lines.append("")
        with (RESULTS / f"profile-{args.workload}-x{args.images}-{role}.collapsed").open("w") as fh:
            for o in outs:
                if o.exists():
                    fh.write(o.read_text())
    out = RESULTS / f"profile-{args.workload}-x{args.images}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines[:6]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
