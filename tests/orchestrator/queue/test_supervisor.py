"""The worker supervisor (issue 16, item 2) with real child processes: a SIGKILLed child is
started again with capped backoff, killing every child leaves the supervisor supervising,
and a stop is passed on once to each child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator import metrics
from orchestrator.queue.supervisor import Supervisor, backoff_s, exit_kind

# A stand-in worker: sleeps until signalled (SIGTERM ends it with status 0).
SLEEPER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "time.sleep(600)\n"
)
BASE_S, CAP_S = 0.2, 0.8
WAIT_S = 20.0
_POLL_S = 0.05


def _restarts(kind: str) -> float:
    value = metrics.WORKER_RESTARTS.labels(kind)._value.get()
    return float(value)


def _wait(predicate: object, what: str, timeout_s: float = WAIT_S) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(_POLL_S)


class Running:
    def __init__(self, boss: Supervisor) -> None:
        self.boss = boss
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.boss.run()

    def pids(self) -> set[int]:
        return {c.pid for c in self.boss.children}


@pytest.fixture
def sleepers() -> Iterator[Running]:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", SLEEPER])
        started.append(proc)
        return proc

    running = Running(Supervisor(start, 2, base_s=BASE_S, cap_s=CAP_S, stable_s=60.0))
    running.thread.start()
    _wait(lambda: len(running.pids()) == 2, "children not started")
    yield running
    running.boss.stop()
    running.thread.join(WAIT_S)
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sigkilled_child_is_started_again(sleepers: Running) -> None:
    before = _restarts("signal")
    first = sleepers.pids()
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: len(sleepers.pids()) == 2 and victim not in sleepers.pids(), "not replaced")
    assert len(sleepers.pids() & first) == 1
    assert _restarts("signal") == before + 1
    assert metrics.WORKER_PROCESSES._value.get() == 2


def test_killing_every_child_leaves_the_supervisor_supervising(sleepers: Running) -> None:
    first = sleepers.pids()
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: len(sleepers.pids()) == 2 and not sleepers.pids() & first, "not replaced")
    assert sleepers.thread.is_alive()
    # And again: the same slots, now on a doubled backoff, still come back.
    second = sleepers.pids()
    for pid in second:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: len(sleepers.pids()) == 2 and not sleepers.pids() & second, "not replaced")


def test_stop_is_passed_on_and_the_supervisor_waits(sleepers: Running) -> None:
    children = list(sleepers.boss.children)
    sleepers.boss.stop(signal.SIGTERM)
    sleepers.thread.join(WAIT_S)
    assert not sleepers.thread.is_alive()
    # Ended by the SIGTERM passed on (its handler, or the default action before the child
    # installed one), and reaped: nothing left running.
    assert [c.poll() for c in children] in ([0, 0], [0, -15], [-15, 0], [-15, -15])
    assert sleepers.code in (0, 128 + 15)


def test_a_crash_loop_is_restarted_with_capped_backoff() -> None:
    starts: list[float] = []

    def start() -> subprocess.Popen[bytes]:
        starts.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    running = Running(Supervisor(start, 1, base_s=BASE_S, cap_s=CAP_S, stable_s=60.0))
    running.thread.start()
    before = _restarts("error")
    _wait(lambda: len(starts) >= 6, "not restarted often enough")
    running.boss.stop()
    running.thread.join(WAIT_S)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # Each gap is the child's short life plus its backoff: 0.2, 0.4, then the 0.8 cap.
    for gap, wait in zip(gaps, (0.2, 0.4, 0.8, 0.8, 0.8), strict=False):
        assert wait <= gap < wait + 5.0, gaps
    assert max(gaps) < CAP_S + 5.0
    assert _restarts("error") >= before + 5


def test_backoff_doubles_to_its_cap_and_exits_are_named() -> None:
    assert [backoff_s(n, 1.0, 60.0) for n in (1, 2, 3, 6, 7, 20)] == [1, 2, 4, 32, 60, 60]
    assert (exit_kind(-9), exit_kind(1), exit_kind(0)) == ("signal", "error", "clean")
    assert set(metrics.CHILD_EXITS) == {"signal", "error", "clean"}
