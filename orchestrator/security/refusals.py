"""Refused keys and tokens: a per-source limit before authentication, and their audit in
aggregate (issue 16).

A flood of bad keys must cost little: each source (the request's address, ``api/origin.py``)
has a bucket of failed authentications (``auth_failure_burst``, refilled at
``auth_failure_rate_per_s``). An empty bucket answers 429 before any key is looked up. Each
refusal is counted in Redis per source and reason; once per ``refused_audit_interval_s`` the
counts of the closed intervals are written to the audit trail, one row per source and
interval (``action='authenticate'``, ``outcome='denied'``, ``detail.count``), instead of a
chained row per request. The API flushes on a timer and once more when it stops.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from psycopg_pool import ConnectionPool
from redis import Redis
from redis.exceptions import ResponseError

from orchestrator.security.ratelimit import RateLimiter
from orchestrator.store.db.audit import record

log = logging.getLogger(__name__)

# Uncollected counts outlive an API that never flushed them this long.
_COUNTS_TTL_S = 7 * 24 * 3600
# How many closed intervals one flush writes at most (the rest next time).
_FLUSH_BATCH = 100
UNKNOWN_SOURCE = "unknown"


class RefusedKeys:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        *,
        rate_per_s: float,
        burst: int,
        interval_s: float,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:refused"
        self.interval_s = interval_s
        self.limiter = RateLimiter(redis, f"{prefix}:authfail", rate_per_s=rate_per_s, burst=burst)

    def check(self, source: str | None) -> None:
        """Before authentication: raise RateLimited if this source has failed too often."""
        self.limiter.check(source or UNKNOWN_SOURCE)

    def refused(self, source: str | None, reason: str) -> None:
        """Count one refusal of ``source`` (spending one of its failure tokens)."""
        source = source or UNKNOWN_SOURCE
        self.limiter.spend(source)
        start = int(time.time() // self.interval_s * self.interval_s)
        key = f"{self.prefix}:{start}"
        pipe = self.redis.pipeline()
        pipe.hincrby(key, f"{source}\x00{reason}", 1)
        pipe.expire(key, _COUNTS_TTL_S)
        pipe.zadd(f"{self.prefix}:intervals", {str(start): start})
        pipe.execute()

    def flush(self, pool: ConnectionPool, *, force: bool = False) -> int:
        """Write the closed intervals' counts (every interval with ``force``); return the
        rows written. Safe to run in several processes: each interval is claimed by one."""
        index = f"{self.prefix}:intervals"
        upto = "+inf" if force else time.time() - self.interval_s
        written = 0
        members: list[bytes] = list(
            self.redis.zrangebyscore(index, "-inf", upto, start=0, num=_FLUSH_BATCH)  # type: ignore[arg-type]
        )
        for member in members:
            start = int(member)
            key = f"{self.prefix}:{start}"
            claimed = f"{key}:flushing:{uuid.uuid4().hex}"
            try:
                self.redis.rename(key, claimed)
            except ResponseError:  # gone: flushed by another process
                self.redis.zrem(index, member)
                continue
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            fields: dict[bytes, bytes] = self.redis.hgetall(claimed)  # type: ignore[assignment]
            for field, n in fields.items():
                source, _, reason = field.decode().partition("\x00")
                counts[source][reason] = int(n)
            try:
                with pool.connection() as conn:
                    for source, reasons in sorted(counts.items()):
                        record(
                            conn,
                            principal="anonymous",
                            action="authenticate",
                            resource_type="api",
                            resource_id=None,
                            outcome="denied",
                            source_ip=source,
                            detail={
                                "count": sum(reasons.values()),
                                "reasons": reasons,
                                "interval_start": datetime.fromtimestamp(start, UTC).isoformat(),
                                "interval_s": self.interval_s,
                            },
                        )
            except Exception:
                # Put the counts back for the next flush (unless new ones arrived meanwhile).
                self.redis.renamenx(claimed, key)
                raise
            self.redis.delete(claimed)
            self.redis.zrem(index, member)
            written += len(counts)
        return written


class Flusher:
    """A daemon thread flushing every ``interval_s``, and once more, forced, on stop."""

    def __init__(self, refused: RefusedKeys, pool: ConnectionPool) -> None:
        self._refused, self._pool = refused, pool
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="refused-keys", daemon=True)

    def start(self) -> Flusher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._refused.interval_s * 2)
        self._flush(force=True)

    def _flush(self, *, force: bool = False) -> None:
        try:
            self._refused.flush(self._pool, force=force)
        except Exception as exc:  # noqa: BLE001 - a dependency down: the counts wait in Redis
            log.warning("refused-key audit flush failed (kept for the next): %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self._refused.interval_s):
            self._flush()


def from_services(services: Any) -> RefusedKeys:
    s = services.settings
    return RefusedKeys(
        services.redis,
        s.queue_prefix,
        rate_per_s=s.auth_failure_rate_per_s,
        burst=s.auth_failure_burst,
        interval_s=s.refused_audit_interval_s,
    )
