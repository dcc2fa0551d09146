"""Before/after on the same machine in one run: the whole stack at an earlier commit and at
the working tree, alternated (A B A B ...), on the same workloads.

    .venv/bin/python -m benchmarks.before_after --before 19f3ed6 --rounds 3

The earlier commit is checked out into a temporary git worktree and put first on
PYTHONPATH for its runs, so the API, the workers and the benchmark client all run its code
(same virtual environment, same Triton, same PostgreSQL and Redis). Each run measures
saturation throughput and the CPU each process spent per image (``measure`` below, which
uses only helpers both trees have). Writes ``benchmarks/results/before-after-<date>.md``;
with ``--only WORKLOAD`` (e.g. the JPEG 2000 radiographs, not in the default three) only
those, to ``before-after-<date>-<workload>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# (name, benchmarks.e2e workload, images per study, studies): one-image CT studies (the worst
# case for per-study costs), 32-slice CT series sent as one request each, and one-image
# uncompressed radiographs (10 MB each: the cost of moving bytes); by name (--only), JPEG 2000
# radiographs (the cost of decoding).
WORKLOADS = (
    ("ct, 1 image per study", "ct-512x512-16bit", 1, 150),
    ("ct, 32-slice series per study", "ct-512x512-16bit", 32, 10),
    ("radiograph 2048x2500, 1 per study", "rx-2048x2500-16bit", 1, 30),
)
ON_REQUEST = (("radiograph 2048x2500 JPEG 2000, 1 per study", "rx-2048x2500-j2k", 1, 20),)


def measure(workload: str, per_study: int, studies: int, workers: int) -> dict[str, float]:
    """One saturation run on a fresh stack; runs inside whichever tree is on PYTHONPATH."""
    import io
    import time
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    import pydicom
    from pydicom.uid import generate_uid

    from benchmarks import e2e

    flat = e2e._corpus(e2e.workloads()[workload], per_study * studies)
    grouped = []
    for s in range(studies):
        uid, series = generate_uid(), generate_uid()
        files = []
        for f in flat[s * per_study : (s + 1) * per_study]:
            ds = pydicom.dcmread(io.BytesIO(f))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, series
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files.append(buf.getvalue())
        grouped.append(files)
    with e2e.bench_stack(Path(tempfile.mkdtemp()), workers) as (stack, db_url, client):
        e2e._wait(db_url, [e2e._post(client, grouped[0][:1])])  # warm every process
        assert stack.triton is not None
        roles = {
            "api": [stack.procs[0].pid],
            "workers": [p.pid for p in stack.procs[1:]],
            "triton": [stack.triton.pid or 0],
            "postgresql": e2e._service_pids("postgres"),
            "redis": e2e._service_pids("redis-server"),
        }
        c0, m0 = e2e.cpu_seconds(roles), psutil.cpu_times()
        t0 = time.monotonic()
        with ThreadPoolExecutor(e2e.UPLOADERS) as pool:
            ids = list(pool.map(lambda fs: e2e._post(client, fs), grouped))
        rows = e2e._wait(db_url, ids)
        c1, m1, t1 = e2e.cpu_seconds(roles), psutil.cpu_times(), time.monotonic()
    images = per_study * studies
    out = {f"cpu_ms:{r}": (c1[r] - c0[r]) / images * 1e3 for r in roles}
    out["img_per_s"] = images / (max(r[1] for r in rows) - min(r[0] for r in rows))
    busy = (sum(m1) - m1.idle - m1.iowait) - (sum(m0) - m0.idle - m0.iowait)
    out["machine_busy"] = busy / ((t1 - t0) * (psutil.cpu_count() or 1))
    return out


def _worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="medtriage-before-")) / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
    )
    # The Triton runtime installed by scripts/setup lives under the repository's .medtriage.
    (path / ".medtriage").symlink_to(REPO / ".medtriage")
    return path


def _run(tree: Path, workload: str, per_study: int, studies: int, workers: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = (
        "import json, runpy, sys; "
        f"m = runpy.run_path({str(Path(__file__))!r}); "
        f"print('RESULT ' + json.dumps(m['measure']({workload!r}, {per_study}, {studies},"
        f" {workers})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run in {tree} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git ref of the 'before' code")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--only",
        action="append",
        choices=[w[0] for w in WORKLOADS + ON_REQUEST],
        help="these workloads (repeatable) instead of the default three",
    )
    args = ap.parse_args()
    chosen = [w for w in WORKLOADS + ON_REQUEST if w[0] in args.only] if args.only else WORKLOADS
    before = _worktree(args.before)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    trees = {
        f"before ({args.before})": before,
        f"after ({head}{' + uncommitted changes' if dirty else ''})": REPO,
    }
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for name, workload, per_study, studies in chosen:
            for i in range(args.rounds):
                for label, tree in trees.items():
                    r = _run(tree, workload, per_study, studies, args.workers)
                    runs.setdefault((name, label), []).append(r)
                    print(
                        f"{name} | {label} | round {i + 1}: {r['img_per_s']:.1f} img/s", flush=True
                    )
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
            capture_output=True,
        )
    lines = [
        f"# Before/after, {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        f"`python -m benchmarks.before_after --before {args.before} --rounds {args.rounds}"
        + "".join(f" --only '{o}'" for o in args.only or [])
        + "`;"
        f" {args.workers} workers, {os.cpu_count()} cores, runs alternated; medians (all runs"
        " in brackets). CPU per image by process, ms.",
        "",
        "| workload | code | img/s | api | workers | triton | postgresql | redis | Σ CPU | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, label), rs in runs.items():

        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        roles = ("api", "workers", "triton", "postgresql", "redis")
        total = statistics.median(sum(r[f"cpu_ms:{x}"] for x in roles) for r in rs)
        each = ", ".join(f"{r['img_per_s']:.1f}" for r in rs)
        lines.append(
            f"| {name} | {label} | {med('img_per_s'):.1f} ({each}) | "
            + " | ".join(f"{med(f'cpu_ms:{x}'):.1f}" for x in roles)
            + f" | {total:.1f} | {med('machine_busy'):.0%} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A run of chosen workloads is named after them, so it never replaces the default run's file.
    suffix = "".join(f"-{w[1]}" for w in chosen) if args.only else ""
    out = RESULTS / f"before-after-{datetime.now(UTC).strftime('%Y-%m-%d')}{suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
