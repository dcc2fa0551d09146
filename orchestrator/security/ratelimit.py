"""Per-key request rate limits: a token bucket in Redis (atomic Lua), 429 with Retry-After."""

from __future__ import annotations

import math
import time
from typing import Any

from redis import Redis

from orchestrator.errors import MedtriageError

# Bucket state outlives idleness only this long (then it is full again anyway).
_IDLE_EXPIRY_FLOOR_S = 60

# KEYS[1] bucket; ARGV: rate/s, burst, now (s), expiry floor (s), cost (0: only look).
# Returns {allowed, seconds_until_one_token}.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[5] or '1')
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - cost
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), math.ceil(burst / rate)))
return {allowed, tostring(wait)}
"""


class RateLimited(MedtriageError):
    http_status = 429

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(f"rate limit exceeded; retry after {self.retry_after_s} s")
        self.headers = {"Retry-After": str(self.retry_after_s)}


class RateLimiter:
    def __init__(self, redis: Redis, prefix: str, *, rate_per_s: float, burst: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.rate = rate_per_s
        self.burst = burst
        self._script: Any = redis.register_script(_TOKEN_BUCKET)

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self.burst > 0

    def _run(self, key: str, cost: int) -> tuple[bool, float]:
        allowed, wait = self._script(
            keys=[f"{self.prefix}:ratelimit:{key}"],
            args=[self.rate, self.burst, time.time(), _IDLE_EXPIRY_FLOOR_S, cost],
            client=self.redis,
        )
        return int(allowed) == 1, float(wait)

    def hit(self, principal_id: str) -> None:
        """Take one token for this principal (an opaque id), or raise RateLimited."""
        if not self.enabled:
            return
        allowed, wait = self._run(principal_id, 1)
        if not allowed:
            raise RateLimited(wait)

    def check(self, key: str) -> None:
        """Raise RateLimited if ``key``'s bucket is empty, taking nothing."""
        if not self.enabled:
            return
        allowed, wait = self._run(key, 0)
        if not allowed:
            raise RateLimited(wait)

    def spend(self, key: str) -> None:
        """Take one token from ``key``'s bucket if it has one (never raises)."""
        if self.enabled:
            self._run(key, 1)
