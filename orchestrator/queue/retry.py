"""Retries for one step: capped exponential backoff with full jitter, transient errors only.

Transient means the same call can succeed unchanged a moment later: Triton UNAVAILABLE
(``ModelUnavailable``), the object store's 5xx/throttling or a lost connection
(``DependencyUnavailable``), a deadlock or a timeout (``DependencyBusy``), and the same two
kinds of untranslated psycopg error (``db.pool.is_outage`` / ``is_busy``: a dropped connection,
the pool's timeout, ``DeadlockDetected``). A psycopg error that is neither (an index row over
its limit, bad data, a violated constraint) is not transient: it would fail again unchanged.
Everything else (bad input, a deadline exceeded, a programming error) is raised at once.
A step that keeps failing transiently is raised after its attempts, and the job is retried
as a whole by RQ and the reconciler.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

from orchestrator.errors import DependencyBusy, DependencyUnavailable, ModelUnavailable
from orchestrator.store.db.pool import is_busy, is_outage

log = logging.getLogger(__name__)

T = TypeVar("T")

# The classes that may be transient (an ``except`` clause needs a tuple); ``is_transient``
# then sorts psycopg's OperationalError by SQLSTATE.
TRANSIENT: tuple[type[BaseException], ...] = (
    ModelUnavailable,
    DependencyUnavailable,
    DependencyBusy,
    psycopg.OperationalError,
)
# Attempts per step, including the first.
STEP_ATTEMPTS = 4
# First backoff ceiling; doubles per attempt up to STEP_BACKOFF_CAP_S (full jitter below it).
STEP_BACKOFF_BASE_S = 0.2
STEP_BACKOFF_CAP_S = 2.0
# A step never spends longer than this retrying, whatever its attempts say.
STEP_DEADLINE_S = 10.0


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.Error):
        return is_outage(exc) or is_busy(exc)
    return isinstance(exc, TRANSIENT)


def backoff_s(
    attempt: int, *, base_s: float = STEP_BACKOFF_BASE_S, cap_s: float = STEP_BACKOFF_CAP_S
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)) (attempt counts from 0)."""
    return random.uniform(0.0, min(cap_s, base_s * (2**attempt)))


def call(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = STEP_ATTEMPTS,
    deadline_s: float = STEP_DEADLINE_S,
    transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn``; on a transient error wait and run it again, at most ``attempts`` times."""
    deadline = time.monotonic() + deadline_s
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not transient(exc) or attempt + 1 >= attempts:
                raise
            pause = backoff_s(attempt)
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: %s, retry %d in %.2fs", what, type(exc).__name__, attempt + 1, pause)
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
