"""Soak: hold a steady share of the stack's saturation throughput and watch for drift.

    python -m benchmarks.soak --minutes 30            # the issue's figure (80 % for 30 min)
    python -m benchmarks.soak --minutes 5 --share 0.8 # a shorter run

Starts the real local stack (Triton, API, workers) on a fresh database, measures saturation
with a burst of one-image CT studies, then sends studies at ``share`` of it (open loop:
arrivals do not wait for completions) for ``--minutes``. Every ``SAMPLE_S`` it records
errors, upload→done p95 of the studies finished in that window, RSS, open file descriptors
and TCP connections of the API, the workers and Triton. The table goes to
``benchmarks/results/soak-<date>.md``; the verdict compares the first and last fifth of the
run (RSS flat within ±10 %, no growth in descriptors or connections, 0 errors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import psycopg

from benchmarks.e2e import (
    RESULTS,
    _corpus,
    _post,
    _restudied,
    bench_stack,
    saturation,
    workloads,
)
from orchestrator.settings import REPO_ROOT

SAMPLE_S = 10.0
WORKLOAD = "ct-512x512-16bit"
DISTINCT_FILES = 64
SATURATION_STUDIES = 120


@dataclass
class Sample:
    t: float
    sent: int
    errors: int
    done: int
    p95_s: float
    rss_mb: dict[str, float]
    fds: dict[str, int]
    conns: dict[str, int]


@dataclass
class State:
    sent: int = 0
    errors: int = 0
    # error kind (HTTP status or exception name) -> count
    kinds: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _procs(pids: dict[str, list[int]]) -> dict[str, list[psutil.Process]]:
    out: dict[str, list[psutil.Process]] = {}
    for role, role_pids in pids.items():
        procs = []
        for pid in role_pids:
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.Error:
                pass
        out[role] = procs
    return out


def _resources(
    pids: dict[str, list[int]],
) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    rss: dict[str, float] = {}
    fds: dict[str, int] = {}
    conns: dict[str, int] = {}
    for role, procs in _procs(pids).items():
        rss[role], fds[role], conns[role] = 0.0, 0, 0
        for p in procs:
            try:
                rss[role] += p.memory_info().rss / 2**20
                fds[role] += p.num_fds()
                conns[role] += len(p.net_connections(kind="tcp"))
            except psutil.Error:
                pass
    return rss, fds, conns


def _finished_since(db_url: str, since: float) -> list[float]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM finished_at - created_at) FROM studies"
            " WHERE finished_at >= to_timestamp(%s)",
            (since,),
        ).fetchall()
    return [float(r[0]) for r in rows]


def run(minutes: float, share: float, workers: int) -> Path:
    home = Path(os.environ.get("MEDTRIAGE_HOME", str(REPO_ROOT / ".medtriage")))
    files = _corpus(workloads()[WORKLOAD], DISTINCT_FILES)
    samples: list[Sample] = []
    with bench_stack(home, workers) as (stack, db_url, client):
        assert stack.triton is not None
        pids = {
            "api": [stack.procs[0].pid],
            "workers": [p.pid for p in stack.procs[1:]],
            "triton": [stack.triton.pid or 0],
        }
        sat, _ = saturation(
            client, db_url, [_restudied(files[i % len(files)]) for i in range(SATURATION_STUDIES)]
        )
        rate = sat * share
        print(
            f"saturation {sat:.1f} studies/s; holding {rate:.1f}/s for {minutes} min",
            flush=True,
        )
        state = State()
        stop = time.monotonic() + minutes * 60

        def send(data: bytes) -> None:
            try:
                sid = _post(client, [data])
                with state.lock:
                    state.ids.append(sid)
            except httpx.HTTPError as exc:
                kind = (
                    str(exc.response.status_code)
                    if isinstance(exc, httpx.HTTPStatusError)
                    else type(exc).__name__
                )
                with state.lock:
                    state.errors += 1
                    state.kinds[kind] += 1

        def arrivals() -> None:
            with ThreadPoolExecutor(8) as pool:
                t0 = time.monotonic()
                i = 0
                while time.monotonic() < stop:
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(send, _restudied(files[i % len(files)]))
                    with state.lock:
                        state.sent += 1
                    i += 1

        sender = threading.Thread(target=arrivals, daemon=True)
        started = time.time()
        sender.start()
        last = time.time()
        while sender.is_alive():
            time.sleep(SAMPLE_S)
            now = time.time()
            lat = _finished_since(db_url, last)
            rss, fds, conns = _resources(pids)
            with state.lock:
                s = Sample(
                    now - started,
                    state.sent,
                    state.errors,
                    len(lat),
                    float(np.percentile(lat, 95)) if lat else float("nan"),
                    rss,
                    fds,
                    conns,
                )
            samples.append(s)
            print(
                f"t={s.t:6.0f}s sent={s.sent} errors={s.errors} done/window={s.done}"
                f" p95={s.p95_s:.2f}s rss={ {k: round(v) for k, v in rss.items()} }"
                f" fds={fds} conns={conns}",
                flush=True,
            )
            last = now
        sender.join()
        # Let the tail drain, then count what finished badly.
        deadline = time.monotonic() + 300
        with psycopg.connect(db_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                open_n = conn.execute(
                    "SELECT count(*) FROM studies WHERE status NOT IN ('done','needs_review','failed')"
                ).fetchone()[0]  # type: ignore[index]
                if open_n == 0:
                    break
                time.sleep(1)
            failed = conn.execute(
                "SELECT count(*) FROM studies WHERE status = 'failed'"
            ).fetchone()[0]  # type: ignore[index]
    return _write(samples, sat, share, minutes, workers, state, int(open_n), int(failed))


def _write(
    samples: list[Sample],
    sat: float,
    share: float,
    minutes: float,
    workers: int,
    state: State,
    still_open: int,
    failed: int,
) -> Path:
    fifth = max(1, len(samples) // 5)
    head, tail = samples[:fifth], samples[-fifth:]

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs) if xs else float("nan")

    lines = [
        f"# Soak, {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        f"- machine: {os.cpu_count()} cores; {workers} workers; workload {WORKLOAD}, one image per study",
        f"- saturation {sat:.1f} studies/s; held {share:.0%} of it for {minutes} min (open loop)",
        f"- studies sent {state.sent}; upload errors {state.errors} {dict(state.kinds)}; failed {failed}; "
        f"unfinished after the drain {still_open}",
        "",
        "| role | RSS first fifth (MiB) | RSS last fifth (MiB) | change | fds first → last | TCP conns first → last |",
        "|---|---|---|---|---|---|",
    ]
    for role in samples[0].rss_mb if samples else []:
        a = mean([s.rss_mb[role] for s in head])
        b = mean([s.rss_mb[role] for s in tail])
        lines.append(
            f"| {role} | {a:.0f} | {b:.0f} | {(b - a) / a:+.1%} |"
            f" {head[0].fds[role]} → {tail[-1].fds[role]} | {head[0].conns[role]} → {tail[-1].conns[role]} |"
        )
    p95_head = mean([s.p95_s for s in head if s.done])
    p95_tail = mean([s.p95_s for s in tail if s.done])
    lines += [
        "",
        f"p95 upload→done: first fifth {p95_head:.2f} s, last fifth {p95_tail:.2f} s",
        "",
        "| t (s) | sent | errors | finished in window | p95 (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s.t:.0f} | {s.sent} | {s.errors} | {s.done} | {s.p95_s:.2f} |" for s in samples]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{datetime.now(UTC):%Y-%m-%d}.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--share", type=float, default=0.8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"wrote {run(args.minutes, args.share, args.workers)}")


if __name__ == "__main__":
    main()
