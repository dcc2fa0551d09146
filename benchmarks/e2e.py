"""End-to-end benchmark of the real local stack, side by side with its baselines, in one run.

    python -m benchmarks.e2e            # full run (8-20 min on 2 shared cores)
    python -m benchmarks.e2e --quick    # smaller counts (~4 min)

Measures, on the same files and models:
- per-stage CPU cost per image in isolation (ingest = parse + store + rows; decode+preprocess;
  raw ONNX Runtime inference of both models) → ideal throughput = cores ÷ Σ costs;
- the platform end to end (HTTP upload → stored → queued → preprocess → Triton triage +
  analysis → results/report): saturation images/s and upload→done latency p50/p95/p99, at
  saturation and at 50 % of it; idle single-study latency; efficiency = measured ÷ ideal;
- a naive sequential loop (pydicom → numpy full-size float + np.percentile → ORT one image at
  a time → one INSERT per result) on the same files;
- Triton gRPC vs raw ONNX Runtime on the same model and threads; dynamic batching on/off;
  1 vs N workers; job grain (one 16-image study vs 16 one-image studies);
- CT as it arrives: 32-slice series, one request per study (per-study costs shared);
- peak RSS of API, workers and Triton.
Writes ``benchmarks/results/e2e-<date>.md`` (+ ``.png``) and ``benchmarks/results/e2e-latest.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import onnxruntime as ort
import psutil
import psycopg
import pydicom
from pydicom.uid import JPEG2000Lossless, generate_uid

import preprocess as pp
from orchestrator.cli.stack import LocalStack
from orchestrator.inference.local_triton.install import install_runtime
from orchestrator.inference.local_triton.process import TritonProcess
from orchestrator.inference.local_triton.render import render_repository
from orchestrator.inference.specs import load_repository
from orchestrator.ingest.core import ingest_file
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT, CliSettings
from orchestrator.store.db import connect_pool, upgrade
from orchestrator.store.db.keys import Principal, create_key
from orchestrator.store.objects import LocalStore

RESULTS = REPO_ROOT / "benchmarks" / "results"
# The stacks measured here take one client's uploads as fast as they come: the per-key rate
# limit (a production guard with its own test) would otherwise cap the figures at its rate.
BENCH_ENV = {"MEDTRIAGE_RATE_LIMIT_PER_S": "1000000", "MEDTRIAGE_RATE_LIMIT_BURST": "1000000"}
os.environ.update(BENCH_ENV)
ADMIN_DB = os.environ.get(
    "MEDTRIAGE_BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TERMINAL = ("done", "failed", "needs_review")
POLL_S = 0.1
STUDY_TIMEOUT_S = 600.0
# Concurrent uploaders for the saturation run (enough to keep the queue non-empty).
UPLOADERS = 4
# Client threads for the Triton-vs-ORT comparison: one caller, and several at once.
INFER_CLIENTS = (1, 8)
# Request batch sizes compared: one image, and a 16-image study in one request.
INFER_BATCHES = (1, 16)


# The series workload: CT studies of this many 512x512 slices, one request per study.
SERIES_SLICES = 32
SERIES = f"ct-series-{SERIES_SLICES}x512x512"


@dataclass
class Counts:
    isolation: int
    saturation: int
    half_load: int
    idle: int
    naive: int
    infer_s: float
    series: int  # studies of SERIES_SLICES slices


QUICK = Counts(isolation=10, saturation=40, half_load=20, idle=3, naive=20, infer_s=4.0, series=3)
FULL = Counts(isolation=30, saturation=150, half_load=60, idle=5, naive=60, infer_s=10.0, series=12)


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, section: str, name: str, value: str) -> None:
        self.rows.append((section, name, value))
        print(f"  {section:<28} {name:<46} {value}", flush=True)


# --- workloads ------------------------------------------------------------------------------


def workloads() -> dict[str, Callable[[str], bytes]]:
    images, _ = load_samples()

    def ct(study_uid: str) -> bytes:
        return radiograph(
            images[hash(study_uid) % len(images)], study_uid=study_uid, size=512, modality="CT"
        )

    def rx(study_uid: str) -> bytes:
        return radiograph(
            images[hash(study_uid) % len(images)], study_uid=study_uid, size=(2048, 2500)
        )

    def rx_j2k(study_uid: str) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(rx(study_uid)))
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    return {"ct-512x512-16bit": ct, "rx-2048x2500-16bit": rx, "rx-2048x2500-j2k": rx_j2k}


def _corpus(make: Callable[[str], bytes], n: int, distinct: int = 4) -> list[bytes]:
    """n files; the pixel data of ``distinct`` files is reused with fresh UIDs (encoding J2K is slow)."""
    base = [make(generate_uid()) for _ in range(min(n, distinct))]
    return [_restudied(base[i % len(base)]) for i in range(n)]


def _restudied(data: bytes) -> bytes:
    """The same image as a new instance of a new study (fresh study, series and SOP UIDs)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def series_corpus(make: Callable[[str], bytes], studies: int, per_study: int) -> list[list[bytes]]:
    """``studies`` studies of ``per_study`` images each (one series per study, fresh UIDs)."""
    flat = _corpus(make, studies * per_study)
    out = []
    for s in range(studies):
        uid, series = generate_uid(), generate_uid()
        files = []
        for i, f in enumerate(flat[s * per_study : (s + 1) * per_study]):
            ds = pydicom.dcmread(io.BytesIO(f))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = uid, series, i + 1
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files.append(buf.getvalue())
        out.append(files)
    return out


# --- isolation costs ------------------------------------------------------------------------


def _cpu_per_item(fn: Callable[[Any], Any], items: list[Any]) -> float:
    """Median CPU seconds (this process) per call."""
    costs = []
    for item in items:
        t0 = time.process_time()
        fn(item)
        costs.append(time.process_time() - t0)
    return statistics.median(costs)


def _on_cpu_s(pids: list[int]) -> float:
    """CPU seconds these processes have run: /proc/<pid>/schedstat (nanoseconds) where the
    kernel has it, else psutil (whose user/system times come in 10 ms ticks)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                total += int(fh.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            total += cpu_seconds({"p": [pid]})["p"]
    return total


def _backend_cpu_per_item(db_url: str, fn: Callable[[Any], Any], items: list[Any]) -> float:
    """Mean CPU seconds of the database's own backends per call of ``fn`` (the server side of
    the rows it writes), over the batch."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
        ]
    before = _on_cpu_s(pids)
    for item in items:
        fn(item)
    return (_on_cpu_s(pids) - before) / max(1, len(items))


def _ort_session(model: str, version: int, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    path = REPO_ROOT / "model_repository" / model / str(version) / "model.onnx"
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def naive_preprocess(ds: pydicom.Dataset) -> np.ndarray:
    """What a user would write: full-size float32, np.percentile window, resize."""
    arr = ds.pixel_array.astype(np.float32)
    arr = arr * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    lo, hi = np.percentile(arr, [0.5, 99.5])
    arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)
    small = cv2.resize(arr, (28, 28), interpolation=cv2.INTER_AREA)
    return ((small - 0.5) / 0.5)[None].astype(np.float32)


def _strip_block(text: str, head: str) -> str:
    """config.pbtxt without the ``head { ... }`` block."""
    start = text.find(head)
    if start < 0:
        return text
    depth = 0
    for i, ch in enumerate(text[start:], start):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "}" and depth == 0:
            return text[:start] + text[i + 1 :]
    return text


# Triton configurations compared on the same rendered models.
TRITON_VARIANTS: dict[str, Callable[[str], str]] = {
    "dynamic batching as committed": lambda t: t,
    "dynamic batching, max delay 0": lambda t: re.sub(
        r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 0", t
    ),
    "no dynamic batching": lambda t: _strip_block(t, "dynamic_batching {"),
}


# Settings compared on the same workload: as committed; Triton's dynamic batcher kept in the
# local CPU rendering (off by default since this comparison); the pool check on every checkout
# it replaced; asynchronous worker commits (measured, not the default).
ABLATION: dict[str, dict[str, str]] = {
    "as committed": {},
    "with the dynamic batcher in the local Triton": {
        "MEDTRIAGE_TRITON_LOCAL_DYNAMIC_BATCHING": "true"
    },
    "uncompressed pixel data decoded in the sandbox too (the default until 2026-11-29)": {
        "MEDTRIAGE_DECODE_ISOLATION_UNCOMPRESSED": "true"
    },
    "with asynchronous worker commits (not the default)": {
        "MEDTRIAGE_WORKER_SYNCHRONOUS_COMMIT": "false"
    },
}


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the stack ------------------------------------------------------------------------------


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"medtriage_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DB, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DB.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(ADMIN_DB, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def bench_stack(home: Path, workers: int) -> Iterator[tuple[LocalStack, str, httpx.Client]]:
    """A fresh database and the whole local stack on it; yields (stack, database URL, a client
    holding an uploader key)."""
    with fresh_database() as db_url:
        settings = CliSettings(
            database_url=db_url,
            queue_prefix=f"bench-{uuid.uuid4().hex[:6]}",
            storage_url=f"file:///tmp/medtriage-bench-{uuid.uuid4().hex[:6]}",
            port=0,
            home=home,
        )
        with psycopg.connect(db_url) as conn:
            _, key = create_key(conn, tenant="bench", name="bench", role="uploader")
        with LocalStack(settings, workers=workers) as stack:
            stack.wait_workers_ready(settings.redis_url)
            with httpx.Client(
                base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
            ) as client:
                yield stack, db_url, client


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes and all their children, MiB (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            total += proc.memory_info().rss
            total += sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return total / 2**20


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, list[int]], period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.period_s = period_s
        self.peak: dict[str, float] = {k: 0.0 for k in pids}
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            for role, pids in self.pids.items():
                self.peak[role] = max(self.peak[role], rss_mib(pids))
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()


def _service_pids(name: str) -> list[int]:
    """PIDs of the machine's shared servers (postgres backends, redis-server)."""
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == name]


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) so far per role, children included."""
    out: dict[str, float] = {}
    for role, role_pids in pids.items():
        total = 0.0
        for pid in role_pids:
            try:
                proc = psutil.Process(pid)
                for p in (proc, *proc.children(recursive=True)):
                    t = p.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
        out[role] = total
    return out


def _post(client: httpx.Client, files: list[bytes]) -> str:
    response = client.post(
        "/v1/studies",
        files=[("files", (f"{i}.dcm", f, "application/dicom")) for i, f in enumerate(files)],
    )
    response.raise_for_status()
    return str(response.json()["id"])


def _wait(db_url: str, ids: list[str]) -> list[tuple[float, float, str]]:
    """(created, finished, status) per study, polling PostgreSQL (the source of truth)."""
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT extract(epoch FROM created_at), extract(epoch FROM finished_at), status"
                " FROM studies WHERE id = ANY(%s)",
                (ids,),
            ).fetchall()
            if len(rows) == len(ids) and all(r[2] in TERMINAL for r in rows):
                return [(float(a), float(b), str(s)) for a, b, s in rows]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(r[2] not in TERMINAL for r in rows)} studies unfinished")
            time.sleep(POLL_S)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def saturation_of(
    client: httpx.Client, db_url: str, studies: list[list[bytes]]
) -> tuple[float, list[float]]:
    """Images/s with every study (one request each) sent as fast as the uploaders go, and
    each study's upload→done latency."""
    with ThreadPoolExecutor(UPLOADERS) as pool:
        ids = list(pool.map(lambda fs: _post(client, fs), studies))
    rows = _wait(db_url, ids)
    span = max(r[1] for r in rows) - min(r[0] for r in rows)
    return sum(map(len, studies)) / span, [r[1] - r[0] for r in rows]


def saturation(client: httpx.Client, db_url: str, files: list[bytes]) -> tuple[float, list[float]]:
    """``saturation_of`` one-image studies."""
    return saturation_of(client, db_url, [[f] for f in files])


def open_loop(client: httpx.Client, db_url: str, files: list[bytes], rate: float) -> list[float]:
    """Arrivals at ``rate`` studies/s regardless of completions; upload→done latencies."""
    ids: list[str] = []
    lock = threading.Lock()

    def send(f: bytes) -> None:
        sid = _post(client, [f])
        with lock:
            ids.append(sid)

    with ThreadPoolExecutor(UPLOADERS * 2) as pool:
        t0 = time.monotonic()
        for i, f in enumerate(files):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, f)
    rows = _wait(db_url, ids)
    return [r[1] - r[0] for r in rows]


# --- main -----------------------------------------------------------------------------------


def run(counts: Counts, workers: int) -> Report:
    report = Report()
    cores = os.cpu_count() or 1
    repo = load_repository(REPO_ROOT / "model_repository")
    versions = {m: max(s.versions) for m, s in repo.items()}
    makers = workloads()
    print("generating workloads...", flush=True)
    corpora = {
        name: _corpus(make, counts.saturation + counts.half_load + counts.idle + 16)
        for name, make in makers.items()
    }
    triage = _ort_session("triage", versions["triage"])
    analysis = _ort_session("analysis", versions["analysis"])
    spec = pp.PreprocessSpec.from_dict(repo["triage"].preprocess)
    shape = tuple(repo["triage"].inputs[0].dims)

    # 1. Isolation costs and the ideal.
    with fresh_database() as db_url:
        pool = connect_pool(db_url, max_size=2)
        pool.wait()
        with psycopg.connect(db_url) as conn:
            key_id, _ = create_key(conn, tenant="bench-iso", name="iso", role="uploader")
            tenant = conn.execute(
                "SELECT tenant_id FROM api_keys WHERE id = %s", (key_id,)
            ).fetchone()[0]
        principal = Principal(key_id=key_id, tenant_id=tenant, name="iso", role="uploader")
        store_dir = Path(f"/tmp/medtriage-bench-{uuid.uuid4().hex[:6]}")
        store = LocalStore(store_dir)
        batch16 = np.zeros((16, *shape), dtype=np.float32)
        infer_cost = (
            _cpu_per_item(
                lambda _: (
                    triage.run(None, {"image": batch16}),
                    analysis.run(None, {"image": batch16}),
                ),
                [0] * 10,
            )
            / 16
        )
        infer_cost_b1 = _cpu_per_item(
            lambda _: (
                triage.run(None, {"image": batch16[:1]}),
                analysis.run(None, {"image": batch16[:1]}),
            ),
            [0] * 20,
        )
        report.add(
            "isolation (CPU s/image)",
            "raw ORT triage+analysis, batch 16",
            f"{infer_cost * 1e3:.2f} ms",
        )
        report.add(
            "isolation (CPU s/image)",
            "raw ORT triage+analysis, batch 1",
            f"{infer_cost_b1 * 1e3:.2f} ms",
        )
        for name, files in corpora.items():
            sample = files[: counts.isolation]
            prep = _cpu_per_item(lambda f: pp.preprocess(pp.read_dicom(f), spec, shape), sample)  # type: ignore[arg-type]
            naive = _cpu_per_item(
                lambda f: naive_preprocess(pydicom.dcmread(io.BytesIO(f))), sample
            )

            def ingest_one(f: bytes) -> None:
                ingest_file(pool, store, principal, "x.dcm", f, max_pixels=10**9, priority=None)

            # This process's CPU (median) plus the database's for the same rows (mean; every
            # file once more, as new studies: ingest_file makes each its own study).
            ingest_own = _cpu_per_item(ingest_one, sample)
            ingest_db = _backend_cpu_per_item(db_url, ingest_one, [_restudied(f) for f in sample])
            ingest = ingest_own + ingest_db
            total = prep + infer_cost + ingest
            ideal = cores / total
            report.figures[f"ideal:{name}"] = ideal
            report.figures[f"prep_speedup:{name}"] = naive / prep
            report.add(
                f"isolation {name}",
                "ingest (parse+store+rows)",
                f"{ingest * 1e3:.1f} ms ({ingest_own * 1e3:.1f} here + {ingest_db * 1e3:.1f}"
                " PostgreSQL)",
            )
            report.add(f"isolation {name}", "decode+preprocess (ours)", f"{prep * 1e3:.1f} ms")
            report.add(
                f"isolation {name}",
                "decode+preprocess (naive)",
                f"{naive * 1e3:.1f} ms ({naive / prep:.1f}x ours)",
            )
            report.add(f"isolation {name}", f"ideal = {cores} cores / Σ", f"{ideal:.1f} img/s")
        pool.close()

    # 2. Triton vs raw ORT on the same model and threads; dynamic batching on/off.
    home = Path(os.environ.get("MEDTRIAGE_HOME", str(REPO_ROOT / ".medtriage")))
    install_runtime(home)
    work = home / "bench"
    import tritonclient.grpc as grpcclient

    def ort_rate(batch: int) -> float:
        x = np.zeros((batch, *shape), dtype=np.float32)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < counts.infer_s:
            triage.run(None, {"image": x})
            n += batch
        return n / (time.perf_counter() - t0)

    def triton_rate(proc: TritonProcess, batch: int, clients: int) -> float:
        x = np.zeros((batch, *shape), dtype=np.float32)
        stop = time.perf_counter() + counts.infer_s
        done = [0] * clients

        def loop(k: int) -> None:
            client = grpcclient.InferenceServerClient(proc.grpc_url)
            inp = grpcclient.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            while time.perf_counter() < stop:
                client.infer(
                    "triage", [inp], model_version=str(versions["triage"]), client_timeout=30
                )
                done[k] += batch

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(loop, range(clients)))
        return sum(done) / (time.perf_counter() - t0)

    raw = {b: ort_rate(b) for b in INFER_BATCHES}
    for b, rate in raw.items():
        report.add("triton overhead", f"raw ORT, 1 thread, batch {b}", f"{rate:.0f} img/s")
    for label, transform in TRITON_VARIANTS.items():
        rendered = render_repository(
            REPO_ROOT / "model_repository", work / f"repo-{label.replace(' ', '-')}"
        )
        for cfg in rendered.glob("*/config.pbtxt"):
            cfg.write_text(transform(cfg.read_text()))
        with TritonProcess(home, rendered, work / "triton-variant.log") as proc:
            for b in INFER_BATCHES:
                for clients in INFER_CLIENTS:
                    rate = triton_rate(proc, b, clients)
                    report.figures[f"triton:{label}:{b}:{clients}"] = rate
                    report.add(
                        "triton overhead",
                        f"Triton gRPC, {label}, batch {b}, {clients} client(s)",
                        f"{rate:.0f} img/s ({rate / raw[b]:.2f}x raw ORT)",
                    )

    # 3. The platform end to end, per workload; naive loop beside it.
    for n_workers in sorted({1, workers, 2 * workers}):
        with bench_stack(home, n_workers) as (stack, db_url, client):
            assert stack.triton is not None
            sampler = RssSampler(
                {
                    "api": [stack.procs[0].pid],
                    "workers": [p.pid for p in stack.procs[1:]],
                    "triton": [stack.triton.pid or 0],
                }
            )
            sampler.start()
            try:
                names = list(corpora) if n_workers == workers else ["ct-512x512-16bit"]
                roles = {
                    **sampler.pids,
                    "postgresql": _service_pids("postgres"),
                    "redis": _service_pids("redis-server"),
                }
                for name in names:
                    files = corpora[name]
                    before = cpu_seconds(roles)
                    sat, lat = saturation(client, db_url, files[: counts.saturation])
                    after = cpu_seconds(roles)
                    ideal = report.figures[f"ideal:{name}"]
                    sect = f"e2e {name}, {n_workers} worker(s)"
                    spent = {r: (after[r] - before[r]) / counts.saturation for r in roles}
                    report.add(
                        sect,
                        "CPU per image by process (ms)",
                        ", ".join(f"{r} {v * 1e3:.1f}" for r, v in spent.items())
                        + f"; Σ {sum(spent.values()) * 1e3:.1f}",
                    )
                    report.add(
                        sect,
                        "saturation throughput",
                        f"{sat:.1f} img/s (efficiency {sat / ideal:.2f} of ideal)",
                    )
                    report.add(
                        sect,
                        "latency at saturation p50/p95/p99",
                        "/".join(f"{_pct(lat, q):.2f}" for q in (50, 95, 99)) + " s",
                    )
                    report.figures[f"sat:{name}:{n_workers}"] = sat
                    if n_workers != workers:
                        continue
                    idle = []
                    for f in files[counts.saturation : counts.saturation + counts.idle]:
                        idle += [r[1] - r[0] for r in _wait(db_url, [_post(client, [f])])]
                    half = open_loop(
                        client,
                        db_url,
                        files[
                            counts.saturation + counts.idle : counts.saturation
                            + counts.idle
                            + counts.half_load
                        ],
                        rate=sat / 2,
                    )
                    p95_half, idle_med = _pct(half, 95), statistics.median(idle)
                    report.add(sect, "idle single-study latency (median)", f"{idle_med:.2f} s")
                    report.add(
                        sect,
                        "latency at 50% load p50/p95/p99",
                        "/".join(f"{_pct(half, q):.2f}" for q in (50, 95, 99)) + " s",
                    )
                    report.add(
                        sect,
                        "p95 at 50% load ÷ idle latency",
                        f"{p95_half / idle_med:.2f} (goal ≤ 3)",
                    )
                    report.figures[f"lat:{name}"] = p95_half
                if n_workers == workers:
                    # Job grain: one 16-image study vs 16 one-image studies (same pixels).
                    ct = corpora["ct-512x512-16bit"][-16:]
                    uid = generate_uid()
                    grouped = []
                    for f in ct:
                        ds = pydicom.dcmread(io.BytesIO(f))
                        ds.StudyInstanceUID = uid
                        buf = io.BytesIO()
                        ds.save_as(buf, enforce_file_format=True)
                        grouped.append(buf.getvalue())
                    t0 = time.perf_counter()
                    _wait(db_url, [_post(client, grouped)])
                    per_study = 16 / (time.perf_counter() - t0)
                    report.add(
                        "job grain (ct, 16 images)", "one 16-image study", f"{per_study:.1f} img/s"
                    )
                    sat16, _ = saturation(client, db_url, _corpus(makers["ct-512x512-16bit"], 16))
                    report.add(
                        "job grain (ct, 16 images)", "16 one-image studies", f"{sat16:.1f} img/s"
                    )
                    # CT as it arrives: a series of slices per study, sent in one request; the
                    # per-study costs (request, job, transactions, report) shared by the slices.
                    series = series_corpus(makers["ct-512x512-16bit"], counts.series, SERIES_SLICES)
                    images = counts.series * SERIES_SLICES
                    sect = f"e2e {SERIES}, {n_workers} worker(s)"
                    before = cpu_seconds(roles)
                    rate, _ = saturation_of(client, db_url, series)
                    after = cpu_seconds(roles)
                    spent = {r: (after[r] - before[r]) / images for r in roles}
                    report.add(
                        sect,
                        "CPU per image by process (ms)",
                        ", ".join(f"{r} {v * 1e3:.1f}" for r, v in spent.items())
                        + f"; Σ {sum(spent.values()) * 1e3:.1f}",
                    )
                    ideal = report.figures["ideal:ct-512x512-16bit"]
                    report.add(
                        sect,
                        "saturation throughput",
                        f"{rate:.1f} img/s (efficiency {rate / ideal:.2f} of the CT ideal)",
                    )
                    report.figures[f"sat:{SERIES}:{n_workers}"] = rate
                    report.figures[f"ideal:{SERIES}"] = ideal  # the same images
            finally:
                sampler.stop()
            for role, mb in sampler.peak.items():
                report.add(f"peak RSS, {n_workers} worker(s)", role, f"{mb:.0f} MiB")

    # 3b. Settings compared, alternated (A B C D A B C D) on one-image CT studies and on
    # 32-slice CT series.
    try:
        ablation: dict[tuple[str, str], list[float]] = {}
        for _ in range(2):
            for label, env in ABLATION.items():
                with _environ(env), bench_stack(home, workers) as (_, db_url, client):
                    files = _corpus(makers["ct-512x512-16bit"], counts.saturation)
                    ablation.setdefault(("ct", label), []).append(
                        saturation(client, db_url, files)[0]
                    )
                    series = series_corpus(
                        makers["ct-512x512-16bit"], max(2, counts.series // 2), SERIES_SLICES
                    )
                    ablation.setdefault((SERIES, label), []).append(
                        saturation_of(client, db_url, series)[0]
                    )
        for (workload, label), rates in ablation.items():
            report.add(
                f"settings compared ({workload}, {workers} workers)",
                label,
                f"{statistics.median(rates):.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in rates)})",
            )
    except Exception as exc:  # noqa: BLE001 - keep the rest of the table
        report.add("settings compared", "failed", repr(exc))

    # 4. The naive sequential loop on the same files, results to PostgreSQL.
    with fresh_database() as db_url, psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE naive_results (file int, model text, label int, confidence real)"
        )
        for name in corpora:
            files = corpora[name][: counts.naive]
            t0 = time.perf_counter()
            for i, f in enumerate(files):
                x = naive_preprocess(pydicom.dcmread(io.BytesIO(f)))[None]
                for model, session in (("triage", triage), ("analysis", analysis)):
                    probs = session.run(None, {"image": x})[0][0]
                    conn.execute(
                        "INSERT INTO naive_results VALUES (%s, %s, %s, %s)",
                        (i, model, int(probs.argmax()), float(probs.max())),
                    )
            rate = len(files) / (time.perf_counter() - t0)
            sat = report.figures.get(f"sat:{name}:{workers}", float("nan"))
            report.figures[f"naive:{name}"] = rate
            report.add(
                f"naive loop {name}", "throughput", f"{rate:.1f} img/s (platform {sat / rate:.2f}x)"
            )
            if name == "ct-512x512-16bit":
                series_rate = report.figures.get(f"sat:{SERIES}:{workers}", float("nan"))
                report.figures[f"naive:{SERIES}"] = rate
                report.add(
                    f"naive loop {name}",
                    f"vs the platform on {SERIES_SLICES}-slice series",
                    f"platform {series_rate / rate:.2f}x",
                )
    return report


def write(report: Report, counts: Counts, workers: int) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        f"# End-to-end benchmark, {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}",
        f"- versions: onnxruntime {ort.__version__}, pydicom {pydicom.__version__}, numpy {np.__version__}",
        f"- settings: {workers} workers (SimpleWorker), one job per study, Triton python backend "
        f"(ORT 1 thread, 1 instance), counts {counts}",
        "- medians of per-item CPU costs; shared machine, other work may be running: compare ratios.",
        "",
        "| section | measure | value |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {n} | {v} |" for s, n, v in report.rows]
    text = "\n".join(lines) + "\n"
    dated = RESULTS / f"e2e-{stamp}.md"
    dated.write_text(text)
    (RESULTS / "e2e-latest.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [*workloads(), SERIES]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        x = np.arange(len(names))
        a.bar(x - 0.27, [report.figures.get(f"ideal:{n}", 0) for n in names], 0.27, label="ideal")
        a.bar(
            x, [report.figures.get(f"sat:{n}:{workers}", 0) for n in names], 0.27, label="platform"
        )
        a.bar(
            x + 0.27, [report.figures.get(f"naive:{n}", 0) for n in names], 0.27, label="naive loop"
        )
        a.set_xticks(x, names, fontsize=7)
        a.set_ylabel("images/s")
        a.legend()
        a.set_title("throughput")
        b.bar(names, [report.figures.get(f"lat:{n}", 0) for n in names])
        b.set_ylabel("seconds")
        b.set_title("p95 upload→done at 50 % load")
        b.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / f"e2e-{stamp}.png", dpi=110)
    except ImportError:
        pass
    return dated


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    counts = QUICK if args.quick else FULL
    report = run(counts, args.workers)
    print(f"\nwrote {write(report, counts, args.workers)}")


if __name__ == "__main__":
    main()
