"""The RQ worker process: one warm Triton channel, DB pool and store per process.

RQ's default Worker forks a child per job (≈15 ms, a cold gRPC channel each time, metrics
lost with the child). ``SimpleWorker`` runs jobs in this process, so everything stays warm.
Concurrency comes from several such processes (``--concurrency N``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from uuid import UUID

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.job import Job

from orchestrator import metrics
from orchestrator.deliver import events, webhooks
from orchestrator.inference import routing
from orchestrator.inference.client import TritonInference
from orchestrator.inference.specs import load_repository
from orchestrator.pipeline.context import WorkerContext
from orchestrator.pipeline.study import process_study
from orchestrator.queue import jobs as jobqueue
from orchestrator.queue import reconcile, supervisor
from orchestrator.security.outbound import OutboundPolicy
from orchestrator.security.tls import GrpcTls
from orchestrator.settings import WorkerSettings
from orchestrator.store.db import connect_pool, upgrade
from orchestrator.store.objects import open_store
from orchestrator.triage import applicability
from preprocess.sandbox import DecodeSandbox

log = logging.getLogger(__name__)

# How long a starting worker waits for Triton to report ready before giving up.
TRITON_READY_TIMEOUT_S = 120.0
TRITON_READY_POLL_S = 0.5
# Exit status of a worker whose job outlived shutdown_grace_s after SIGTERM.
EXIT_GRACE_EXPIRED = 3
# RQ ends its loop (instead of retrying) when its own bookkeeping around a job meets a Redis
# error, e.g. a Redis restart mid-job; the process starts a fresh loop after this long.
RESTART_DELAY_S = 2.0
# RQ's maintenance (cleaning its registries; starting its scheduler process again if it died,
# e.g. with a Redis restart) runs every 10 minutes by default; a retry waiting on a dead
# scheduler would wait as long. The reconciler queues overdue retries too (reconcile.py).
MAINTENANCE_INTERVAL_S = 30
# Set once a stop is asked (SIGTERM/SIGINT through RQ's handlers): no fresh loop after that.
_STOP = threading.Event()

_CONTEXT: WorkerContext | None = None


def run_study_job(study_id: str) -> str:
    """RQ entry point; takes an opaque id only (job arguments end up in logs)."""
    if _CONTEXT is None:
        raise RuntimeError("worker context not initialised; start with `medtriage worker`")
    from rq import get_current_job

    job: Job | None = get_current_job()
    jid = job.id if job is not None else jobqueue.job_id(UUID(study_id))
    _wait_for_triton(_CONTEXT)
    with metrics.JOBS_IN_FLIGHT.track_inprogress():
        return process_study(_CONTEXT, UUID(study_id), jid)


def _wait_for_triton(ctx: WorkerContext) -> None:
    """Hold a job (not fail it) while Triton restarts; the liveness heartbeat keeps beating,
    so the reconciler does not take it away. Past the bound the job runs and fails
    transiently, and is retried."""
    deadline = time.monotonic() + TRITON_READY_TIMEOUT_S
    while not ctx.inference.is_ready() and time.monotonic() < deadline:
        time.sleep(TRITON_READY_POLL_S)


class _Worker(SimpleWorker):
    """SimpleWorker whose warm shutdown (SIGTERM: finish the job, then exit) is bounded."""

    grace_s: float = 60.0

    def request_stop(self, signum: int, frame: object) -> None:
        _STOP.set()

        def _expire() -> None:
            time.sleep(self.grace_s)
            log.warning("job still running %.0fs after SIGTERM; exiting", self.grace_s)
            os._exit(EXIT_GRACE_EXPIRED)

        threading.Thread(target=_expire, daemon=True).start()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]


def build_context(settings: WorkerSettings, name: str) -> WorkerContext:
    models = load_repository(settings.model_repository)
    # A malformed rule file stops the worker here, naming the file and line.
    sets = applicability.load_sets(settings.model_repository, models)
    inference = TritonInference(settings.triton_grpc_url, tls=GrpcTls.from_settings(settings))
    deadline = time.monotonic() + TRITON_READY_TIMEOUT_S
    while not inference.is_ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Triton at {settings.triton_grpc_url} not ready")
        time.sleep(TRITON_READY_POLL_S)
    upgrade(settings.database_url)
    pool = connect_pool(
        settings.database_url,
        min_size=1,
        max_size=4,
        check_after_s=settings.db_check_after_s,
        synchronous_commit=settings.worker_synchronous_commit,
    )
    pool.wait()
    with pool.connection() as conn:
        routing.sync_versions(conn, {m: spec.versions for m, spec in models.items()})
    store = open_store(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        encryption_keys=settings.storage_encryption_keys,
        s3_sse=settings.s3_sse,
        s3_kms_key_id=settings.s3_kms_key_id,
    )
    publisher = events.EventPublisher(jobqueue.connect(settings.redis_url), settings.queue_prefix)
    decoder = (
        DecodeSandbox(memory_mb=settings.decode_memory_mb, timeout_s=settings.decode_timeout_s)
        if settings.decode_isolation
        else None
    )
    return WorkerContext(
        settings,
        pool,
        store,
        inference,
        models,
        sets=sets,
        worker_name=name,
        events=publisher,
        sandbox=decoder,
    )


def run_one(settings: WorkerSettings, *, burst: bool = False) -> None:
    """One worker process: build the warm context, then take jobs until told to stop."""
    global _CONTEXT
    name = f"{socket.gethostname()}-{os.getpid()}"
    _CONTEXT = build_context(settings, name)
    redis = jobqueue.connect(settings.redis_url)
    announcer = _announce_metrics(settings, redis, name)
    background = reconcile.Background(_CONTEXT.pool, settings, name)
    background.start()
    dispatcher = webhooks.Dispatcher(
        settings.database_url,
        outbound=OutboundPolicy.from_settings(settings),
        ring=getattr(_CONTEXT.store, "ring", None),
    )
    dispatcher.start()
    rq_redis = jobqueue.connect_worker(settings.redis_url)

    def make_worker() -> _Worker:
        worker = _Worker(
            [Queue(settings.queue_name, connection=rq_redis)],
            connection=rq_redis,
            name=name,
            maintenance_interval=MAINTENANCE_INTERVAL_S,
        )
        worker.grace_s = settings.shutdown_grace_s
        return worker

    log.info("worker %s taking jobs from %s", name, settings.queue_name)
    try:
        work_until_stopped(make_worker, burst=burst)
    finally:
        dispatcher.stop()
        background.stop()
        if announcer is not None:
            announcer.stop()
        if _CONTEXT.sandbox is not None:
            _CONTEXT.sandbox.close()
        _CONTEXT.pool.close()


def work_until_stopped(make_worker: Callable[[], _Worker], *, burst: bool = False) -> None:
    """RQ's loop until a stop is asked (or a burst ends). When the loop ends without one (RQ
    quits on a Redis error in its own bookkeeping, or raises one from its teardown), a fresh
    loop starts under the same name after RESTART_DELAY_S, rather than the process exiting
    with nothing to restart it; the job that was in hand is requeued by the reconciler."""
    while True:
        worker = make_worker()
        try:
            worker.work(burst=burst, logging_level="WARNING", with_scheduler=True)
        except RedisError as exc:
            log.warning("RQ's loop ended on a Redis error: %s", type(exc).__name__)
        if burst or _STOP.is_set():
            return
        log.warning(
            "RQ's loop ended without a stop request; a fresh one in %.0f s", RESTART_DELAY_S
        )
        # RQ's teardown may not have reached Redis: free the name for the next loop.
        with contextlib.suppress(RedisError):
            worker.register_death()  # type: ignore[no-untyped-call]
        if _STOP.wait(RESTART_DELAY_S):
            return


def _announce_metrics(
    settings: WorkerSettings, redis: Redis, name: str
) -> metrics.Announcer | None:
    """Serve this process's metrics and keep the endpoint announced (None when off)."""
    port = metrics.serve_worker_metrics(
        settings.worker_metrics_port,
        settings.worker_metrics_port_span,
        settings.worker_metrics_address,
    )
    if port is None:
        return None
    host = metrics.advertised_host(settings.worker_metrics_address)
    announcer = metrics.Announcer(redis, settings.queue_prefix, name, host, port)
    announcer.start()
    return announcer


def run(settings: WorkerSettings) -> int:
    """Start ``settings.concurrency`` worker processes, start again any that dies
    (supervisor.py), and wait; SIGTERM/SIGINT are passed on."""
    if settings.concurrency <= 1:
        run_one(settings)
        return 0
    env = {**os.environ, "MEDTRIAGE_CONCURRENCY": "1"}
    host = socket.gethostname()
    redis = jobqueue.connect(settings.redis_url)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker"], env=env)

    def forget(child: subprocess.Popen[bytes]) -> None:
        # A killed child could not withdraw its metrics endpoint (named like the worker).
        with contextlib.suppress(RedisError):
            metrics.unregister_endpoint(redis, settings.queue_prefix, f"{host}-{child.pid}")

    boss = supervisor.Supervisor(start, settings.concurrency, on_exit=forget)
    signal.signal(signal.SIGTERM, boss.stop)
    signal.signal(signal.SIGINT, boss.stop)
    # The supervisor takes the range's first free port; only when the range leaves one for
    # every child too (a range sized for the children alone stays theirs).
    announcer = (
        _announce_metrics(settings, redis, f"{host}-{os.getpid()}-supervisor")
        if settings.worker_metrics_port_span > settings.concurrency
        else None
    )
    try:
        return boss.run()
    finally:
        if announcer is not None:
            announcer.stop()
