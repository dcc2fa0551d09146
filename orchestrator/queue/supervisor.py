"""`medtriage worker` with concurrency > 1: N worker processes, each started again when it dies.

A child that ends without being asked (SIGKILL, the OOM killer, a crash, an exit) is started
again in its slot after a backoff that doubles per quick death, from ``RESTART_BASE_S`` up to
``RESTART_CAP_S``; a child that ran ``STABLE_AFTER_S`` resets its slot. So a crash loop costs
a start a minute, not a busy loop, and capacity comes back by itself. SIGTERM/SIGINT are
passed on to every child; the supervisor then waits for them (their own warm-shutdown grace)
and exits with the worst status. The job a dead child held is requeued by the reconciler.

The supervisor exports ``medtriage_worker_restarts_total`` and ``medtriage_worker_processes``
from its own metrics endpoint (announced like a worker's), and removes a dead child's
endpoint from the announced set.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator import metrics

log = logging.getLogger(__name__)

# First wait before a dead child is started again; doubles per quick death up to the cap.
RESTART_BASE_S = 1.0
RESTART_CAP_S = 60.0
# A child that ran this long was healthy: its slot's next restart waits RESTART_BASE_S again.
STABLE_AFTER_S = 60.0
# How often the supervisor looks at its children.
POLL_S = 0.2


def exit_kind(returncode: int) -> str:
    """One of metrics.CHILD_EXITS (a negative return code is the signal that ended it)."""
    return "signal" if returncode < 0 else "error" if returncode else "clean"


def backoff_s(
    quick_deaths: int, base_s: float = RESTART_BASE_S, cap_s: float = RESTART_CAP_S
) -> float:
    return float(min(cap_s, base_s * 2 ** max(0, quick_deaths - 1)))


@dataclass
class _Slot:
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Keeps ``count`` copies of ``start()`` running until ``stop()``."""

    def __init__(
        self,
        start: Callable[[], subprocess.Popen[bytes]],
        count: int,
        *,
        on_exit: Callable[[subprocess.Popen[bytes]], None] | None = None,
        base_s: float = RESTART_BASE_S,
        cap_s: float = RESTART_CAP_S,
        stable_s: float = STABLE_AFTER_S,
    ) -> None:
        self.start = start
        self.slots = [_Slot() for _ in range(count)]
        self.on_exit = on_exit
        self.base_s, self.cap_s, self.stable_s = base_s, cap_s, stable_s
        self.stopping = threading.Event()
        self._signal: int = signal.SIGTERM
        self._signalled: set[int] = set()

    @property
    def children(self) -> Sequence[subprocess.Popen[bytes]]:
        return [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        """Pass ``signum`` on to every child; start no more (safe in a signal handler)."""
        self._signal = signum
        self.stopping.set()
        self._pass_on()

    def _pass_on(self) -> None:
        # Once per child: a second SIGTERM makes RQ abandon the job in hand (cold shutdown).
        for child in self.children:
            if child.pid not in self._signalled:
                self._signalled.add(child.pid)
                child.send_signal(self._signal)

    def _spawn(self, slot: _Slot) -> None:
        slot.proc = self.start()
        slot.started_at = time.monotonic()

    def _reap(self, slot: _Slot, now: float) -> None:
        assert slot.proc is not None
        pid, code = slot.proc.pid, slot.proc.returncode
        if self.on_exit is not None:
            self.on_exit(slot.proc)
        if now - slot.started_at >= self.stable_s:
            slot.quick_deaths = 0
        slot.quick_deaths += 1
        wait = backoff_s(slot.quick_deaths, self.base_s, self.cap_s)
        slot.restart_at = now + wait
        slot.proc = None
        metrics.WORKER_RESTARTS.labels(exit_kind(code)).inc()
        log.warning("worker pid %s ended (status %s); a new one in %.0f s", pid, code, wait)

    def run(self) -> int:
        """Supervise until stopped; then wait for the children. Returns the worst status."""
        for slot in self.slots:
            self._spawn(slot)
        while not self.stopping.is_set():
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is not None:
                    self._reap(slot, now)
                if slot.proc is None and now >= slot.restart_at and not self.stopping.is_set():
                    self._spawn(slot)
            metrics.WORKER_PROCESSES.set(len(self.children))
            self.stopping.wait(POLL_S)
        self._pass_on()  # a child started while the signal arrived
        codes = [s.proc.wait() for s in self.slots if s.proc is not None]
        metrics.WORKER_PROCESSES.set(0)
        # A child ended by signal N reports 128 + N, as a shell would.
        return max((128 - c if c < 0 else c for c in codes), default=0)
