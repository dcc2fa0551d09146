"""Inference capacity of a Triton server for the triage + analysis pair, against the seed's
2,000 images a day.

    python -m benchmarks.triton_throughput                    # starts the local CPU Triton
    python -m benchmarks.triton_throughput --url HOST:8001    # any running Triton, e.g. the
                                                              # GPU one of docker-compose.gpu.yml

For each request batch size and number of concurrent clients, every client sends the same
preprocessed batch to ``triage`` then ``analysis`` (what a worker does per study) for
``--seconds``; images/s counts images through both models. The table (medians of
``--repeats`` runs) goes to ``benchmarks/results/triton-<device>-<date>.md``.

Kept short on purpose: the default sweep takes about 2 minutes, so it fits the few minutes
of a lent GPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from orchestrator.inference.specs import load_repository
from orchestrator.settings import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
SEED_IMAGES_PER_DAY = 2000
SECONDS_PER_DAY = 86_400
MODELS = ("triage", "analysis")


def measure(url: str, batch: int, clients: int, seconds: float, shape: tuple[int, ...]) -> float:
    """Images/s through both models with ``clients`` callers sending ``batch`` images each."""
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    stop = time.perf_counter() + seconds

    def loop(_: int) -> int:
        client = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        done = 0
        while time.perf_counter() < stop:
            for model in MODELS:
                client.infer(model, [inp], client_timeout=60)
            done += batch
        client.close()
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(loop, range(clients)))
    return total / (time.perf_counter() - t0)


def run(
    url: str, device: str, seconds: float, repeats: int, batches: list[int], clients: list[int]
) -> Path:
    spec = load_repository(REPO_ROOT / "model_repository")["triage"]
    shape = tuple(spec.inputs[0].dims)
    rows = []
    for b in batches:
        for c in clients:
            rates = [measure(url, b, c, seconds, shape) for _ in range(repeats)]
            rate = statistics.median(rates)
            per_day = rate * SECONDS_PER_DAY
            rows.append((b, c, rate, per_day, per_day / SEED_IMAGES_PER_DAY))
            print(
                f"batch {b:>3} clients {c:>3}: {rate:9.1f} img/s  {per_day / SEED_IMAGES_PER_DAY:10.0f}x seed",
                flush=True,
            )
    best = max(rows, key=lambda r: r[2])
    stamp = datetime.now(UTC)
    lines = [
        f"# Triton inference capacity ({device}), {stamp.isoformat(timespec='seconds')}",
        "",
        f"- server: {url} ({device}); client host: {platform.platform()}",
        f"- triage then analysis per request, {seconds:.0f} s per cell, median of {repeats}",
        f"- seed figure: {SEED_IMAGES_PER_DAY} images/day",
        "",
        "| request batch | clients | images/s | images/day | × seed's 2,000/day |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {c} | {r:.1f} | {d:,.0f} | {x:,.0f} |" for b, c, r, d, x in rows]
    lines += [
        "",
        f"Best: {best[2]:.1f} images/s = {best[3]:,.0f} images/day = {best[4]:,.0f}× the seed's "
        "2,000 images/day (inference only; the end-to-end figures are in e2e-latest.md).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"triton-{device}-{stamp:%Y-%m-%d}.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="Triton gRPC host:port; default: start the local CPU Triton")
    parser.add_argument("--device", default=None, help="label for the table (default cpu/gpu)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    if args.url:
        out = run(
            args.url, args.device or "gpu", args.seconds, args.repeats, args.batches, args.clients
        )
    else:
        from orchestrator.inference.local_triton.install import install_runtime
        from orchestrator.inference.local_triton.process import TritonProcess
        from orchestrator.inference.local_triton.render import render_repository

        home = REPO_ROOT / ".medtriage"
        install_runtime(home)
        rendered = render_repository(
            REPO_ROOT / "model_repository", home / "bench" / "repo-throughput"
        )
        with TritonProcess(home, rendered, home / "bench" / "triton-throughput.log") as proc:
            out = run(
                proc.grpc_url,
                args.device or "cpu",
                args.seconds,
                args.repeats,
                args.batches,
                args.clients,
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
