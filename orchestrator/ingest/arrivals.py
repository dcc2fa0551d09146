"""Study completeness: instances that arrive over time (STOW-RS, C-STORE) are grouped by
study and the study is queued once no instance has arrived for ``stable_age_s`` (like
Orthanc's StableAge), or at once when the sender says the study is complete.

A study whose job is running when it becomes due stays waiting and is queued after that run
(the run lists the study's instances when it starts, so it would miss the late ones). The
sweeper is a thread in each ingesting process; row locks keep several from colliding.
"""

from __future__ import annotations

import logging
import threading
from uuid import UUID

from psycopg_pool import ConnectionPool
from redis import Redis

from orchestrator import lifecycle
from orchestrator.ingest import core as ingest
from orchestrator.queue import jobs as jobqueue
from orchestrator.store.db import arrivals as db
from orchestrator.store.db import translate_errors

log = logging.getLogger(__name__)

# How often the sweeper looks for due studies.
SWEEP_INTERVAL_S = 1.0
# Studies queued per sweep at most (the rest wait for the next sweep).
SWEEP_BATCH = 100


def sweep(
    pool: ConnectionPool,
    redis: Redis,
    queue_name: str,
    *,
    stable_age_s: float,
    job_timeout_s: int,
) -> list[UUID]:
    """Queue the studies that are due; return them."""
    with translate_errors(), pool.connection() as conn:
        ready = [
            (study_id, source)
            for study_id, source in db.due(conn, stable_age_s=stable_age_s, limit=SWEEP_BATCH)
            # A running job would miss the new instances: the next sweep after it takes them.
            if not jobqueue.job_running(redis, study_id)
        ]
        for study_id, _ in ready:
            db.forget(conn, study_id)
    # Taken off the list (committed) before queueing, which may put a study back on it.
    queued: list[UUID] = []
    for study_id, source in ready:
        try:
            lifecycle.queue(pool, redis, queue_name, study_id, job_timeout_s=job_timeout_s)
        except Exception:
            ingest.record_arrival(pool, study_id, source=source, instances=0, complete=True)
            raise
        queued.append(study_id)
    return queued


class Sweeper:
    """A daemon thread running ``sweep`` every SWEEP_INTERVAL_S until stopped."""

    def __init__(
        self,
        pool: ConnectionPool,
        redis: Redis,
        queue_name: str,
        *,
        stable_age_s: float,
        job_timeout_s: int,
        interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self._args = (pool, redis, queue_name)
        self._stable_age_s, self._job_timeout_s = stable_age_s, job_timeout_s
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="arrivals-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s * 5)

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self._interval_s):
            try:
                sweep(
                    *self._args,
                    stable_age_s=self._stable_age_s,
                    job_timeout_s=self._job_timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - a dependency down: try again next time
                if not failing:  # once per outage, not once per second
                    log.warning(
                        "arrivals sweep failed (retrying every %.0fs): %s", self._interval_s, exc
                    )
                failing = True
            else:
                if failing:
                    log.info("arrivals sweep recovered")
                failing = False
