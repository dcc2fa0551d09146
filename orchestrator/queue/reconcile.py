"""The reconciler: PostgreSQL says a study is open, Redis must have a live job for it.

Redis is only the transport (ours keeps nothing on disk). A study whose state is received,
queued or processing, untouched for ``reconcile_stale_after_s``, is checked against RQ:

- job queued (and really in the queue list), deferred, or scheduled (in the scheduled
  registry, its time not long past) → fine;
- job started by a worker whose liveness key is still fresh → fine;
- otherwise (no job: Redis restarted; started by a dead worker: SIGKILL; failed after RQ's
  retries; finished without the study finishing) → requeued, or dead-lettered once the job
  has had ``max_attempts`` attempts.

A study still gathering instances (``received`` with a ``study_arrivals`` row younger than
``ingest_stable_age_s`` + the stale time) waits for the arrivals sweeper and is not stale.

RQ alone is not enough: a SIGKILLed SimpleWorker's job stays 'started' until its registry
entry expires (job timeout + a minute), and a lost Redis loses every job. RQ's scheduler (a
process forked by one worker, which moves a retry from ``rq:scheduled:<queue>`` to the queue
when its time comes) dies with a Redis restart and comes back only at the worker's next
maintenance: each pass first queues every scheduled job more than ``SCHEDULED_OVERDUE_S``
past its time (``enqueue_overdue``), whatever became of the scheduler.

Each worker process runs ``Background``: it refreshes the worker's liveness key every few
seconds (a thread, so it beats during a long job too) and, at most once per interval across
all workers (a Redis lock), runs one reconcile pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from orchestrator import lifecycle
from orchestrator.errors import MedtriageError
from orchestrator.queue import deadletter
from orchestrator.queue import jobs as jobqueue
from orchestrator.settings import CommonSettings
from orchestrator.store.db import studies as db
from orchestrator.store.db import translate_errors

log = logging.getLogger(__name__)

# A worker's liveness key lives this long; it is refreshed every HEARTBEAT_INTERVAL_S.
ALIVE_TTL_S = 10
HEARTBEAT_INTERVAL_S = 2.0
# Studies looked at per pass (oldest first); the next pass takes the rest.
BATCH_SIZE = 500
# RQ's scheduler moves a due job within a second (its interval); a job this far past its time
# has no live scheduler, and the reconciler queues it itself. Long enough that the two never
# race for a job a live scheduler is about to move.
SCHEDULED_OVERDUE_S = 15.0

ACTIVE, LOST, ABANDONED, FAILED, FINISHED = "active", "lost", "abandoned", "failed", "finished"


def alive_key(prefix: str, worker_name: str) -> str:
    return f"{prefix}:alive:{worker_name}"


def lock_key(prefix: str) -> str:
    return f"{prefix}:reconcile-lock"


def mark_alive(redis: Redis, prefix: str, worker_name: str) -> None:
    redis.set(alive_key(prefix, worker_name), "1", ex=ALIVE_TTL_S)


def job_state(redis: Redis, prefix: str, queue_name: str, study_id: UUID) -> str:
    """What RQ knows about the study's job, reduced to whether someone will run it."""
    jid = jobqueue.job_id(study_id)
    try:
        job = Job.fetch(jid, connection=redis)
    except NoSuchJobError:
        return LOST
    status = job.get_status(refresh=False)
    if status == JobStatus.DEFERRED:
        return ACTIVE
    if status == JobStatus.SCHEDULED:
        # Overdue ones were queued by enqueue_overdue before this; in no registry is lost.
        registry = ScheduledJobRegistry(queue_name, connection=redis)  # type: ignore[no-untyped-call]
        return ACTIVE if redis.zscore(registry.key, jid) is not None else LOST
    if status == JobStatus.QUEUED:
        # 'queued' but in no list (a worker died between taking it and starting it) is lost.
        in_queue = redis.lpos(Queue(queue_name, connection=redis).key, jid) is not None
        return ACTIVE if in_queue else LOST
    if status == JobStatus.STARTED:
        worker = job.worker_name
        return ACTIVE if worker and redis.exists(alive_key(prefix, worker)) else ABANDONED
    if status == JobStatus.FAILED:
        return FAILED
    return FINISHED


def enqueue_overdue(
    redis: Redis, queue_name: str, overdue_s: float = SCHEDULED_OVERDUE_S
) -> list[str]:
    """Queue every job of ``queue_name`` waiting in RQ's scheduled registry (a retry's wait)
    more than ``overdue_s`` past its time; returns their ids. The ZREM claims a job, so a
    scheduler that comes back meanwhile cannot queue it a second time."""
    queue = Queue(queue_name, connection=redis)
    registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
    moved: list[str] = []
    for jid in registry.get_jobs_to_schedule(int(time.time() - overdue_s), chunk_size=BATCH_SIZE):
        if not redis.zrem(registry.key, jid):
            continue
        try:
            job = Job.fetch(jid, connection=redis)
        except NoSuchJobError:
            continue
        queue.enqueue_job(job, at_front=job.should_enqueue_at_front())
        moved.append(jid)
    return moved


@dataclass
class Pass:
    checked: int = 0
    requeued: list[UUID] = field(default_factory=list)
    dead_lettered: list[UUID] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "overdue_scheduled_queued": self.overdue,
            "requeued": [str(s) for s in self.requeued],
            "dead_lettered": [str(s) for s in self.dead_lettered],
        }


def reconcile_once(pool: ConnectionPool, redis: Redis, settings: CommonSettings) -> Pass:
    """One pass over the open studies; requeue or dead-letter those nobody will run."""
    result = Pass(overdue=enqueue_overdue(redis, settings.queue_name))
    for jid in result.overdue:
        log.warning("job %s was scheduled long ago and never queued; queued now", jid)
    with translate_errors(), pool.connection() as conn:
        rows = db.stale_open(
            conn,
            stage=jobqueue.STAGE_PROCESS,
            open_states=[st.value for st in lifecycle.OPEN],
            received=lifecycle.StudyStatus.RECEIVED.value,
            stale_after_s=settings.reconcile_stale_after_s,
            gathering_s=settings.ingest_stable_age_s + settings.reconcile_stale_after_s,
            limit=BATCH_SIZE,
        )
    for study_id, attempts, last_error in rows:
        result.checked += 1
        state = job_state(redis, settings.queue_prefix, settings.queue_name, study_id)
        if state == ACTIVE:
            continue
        if attempts >= settings.max_attempts:
            reason = f"job {state}" + (f"; last error: {last_error}" if last_error else "")
            with translate_errors(), pool.connection() as conn:
                if deadletter.add(conn, study_id, reason=reason, attempts=int(attempts)):
                    result.dead_lettered.append(study_id)
            log.warning("study %s dead-lettered after %d attempts (%s)", study_id, attempts, state)
            continue
        with translate_errors(), pool.connection() as conn:
            # Touch it so the next pass waits the stale time again; create the job row if
            # the ingest died before writing it.
            priority = lifecycle.touch_open(conn, study_id)
            db.ensure_job(
                conn,
                job_id=jobqueue.job_id(study_id),
                study_id=study_id,
                stage=jobqueue.STAGE_PROCESS,
            )
        if priority is not None:
            jobqueue.requeue_study(
                redis,
                settings.queue_name,
                study_id,
                job_timeout_s=settings.job_timeout_s,
                priority=priority,
            )
            result.requeued.append(study_id)
            log.warning("study %s requeued (job %s)", study_id, state)
    return result


def try_reconcile(
    pool: ConnectionPool, redis: Redis, settings: CommonSettings, owner: str
) -> Pass | None:
    """Run a pass unless another process ran one within the interval (a Redis lock)."""
    ttl = max(1, int(settings.reconcile_interval_s))
    if not redis.set(lock_key(settings.queue_prefix), owner, nx=True, ex=ttl):
        return None
    return reconcile_once(pool, redis, settings)


class Background(threading.Thread):
    """Liveness heartbeat + periodic reconcile, inside a worker process."""

    def __init__(self, pool: ConnectionPool, settings: CommonSettings, worker_name: str) -> None:
        super().__init__(name="medtriage-reconciler", daemon=True)
        self.pool = pool
        self.settings = settings
        self.worker_name = worker_name
        self.redis = jobqueue.connect(settings.redis_url)
        self.stopping = threading.Event()

    def beat(self) -> None:
        try:
            mark_alive(self.redis, self.settings.queue_prefix, self.worker_name)
        except RedisError as exc:
            log.warning("liveness heartbeat failed: %s", type(exc).__name__)

    def run(self) -> None:
        since_pass = float("inf")  # a pass right at start: recover what a crash left behind
        while not self.stopping.is_set():
            self.beat()
            if since_pass >= self.settings.reconcile_interval_s:
                since_pass = 0.0
                try:
                    done = try_reconcile(self.pool, self.redis, self.settings, self.worker_name)
                    if done and (done.requeued or done.dead_lettered or done.overdue):
                        log.warning("reconcile: %s", done.public())
                except (MedtriageError, RedisError, OSError) as exc:
                    log.warning("reconcile pass failed: %s", type(exc).__name__)
                except Exception:  # noqa: BLE001 - the thread must outlive any one bad pass
                    log.exception("reconcile pass crashed")
            self.stopping.wait(HEARTBEAT_INTERVAL_S)
            since_pass += HEARTBEAT_INTERVAL_S

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(RedisError):
            self.redis.delete(alive_key(self.settings.queue_prefix, self.worker_name))
