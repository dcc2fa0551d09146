"""The worker process outlives RQ's loop: RQ ends its loop (rather than retrying) when its own
bookkeeping around a job meets a Redis error, as in a Redis restart mid-job, and nothing would
start the process again. A fresh loop starts instead, until a stop is asked. Unit test: the
loops are stand-ins for RQ's (the fault tests restart a real Redis under real workers)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.queue import worker


class Loop:
    """One RQ loop: how it ends, and what the process did with it."""

    def __init__(self, ends: str) -> None:
        self.ends = ends
        self.worked = False
        self.death_registered = False

    def work(self, **_: Any) -> bool:
        self.worked = True
        if self.ends == "redis error":
            raise RedisConnectionError("Connection reset by peer")
        if self.ends == "stop":
            worker._STOP.set()  # what SIGTERM does through _Worker.request_stop
        return False  # "quitting" after an error, or stopped: RQ returns either way

    def register_death(self) -> None:
        self.death_registered = True


@pytest.fixture
def loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_STOP", threading.Event())
    monkeypatch.setattr(worker, "RESTART_DELAY_S", 0.0)


@pytest.mark.usefixtures("loops")
def test_a_loop_that_ends_without_a_stop_request_is_followed_by_a_fresh_one() -> None:
    made = iter([Loop("quit"), Loop("redis error"), Loop("stop"), Loop("never")])
    started: list[Loop] = []

    def make() -> Any:
        started.append(next(made))
        return started[-1]

    worker.work_until_stopped(make)
    assert [loop.ends for loop in started] == ["quit", "redis error", "stop"]
    assert all(loop.worked for loop in started)
    # The ended loops' names are freed for the next; the stopped one's teardown is RQ's own.
    assert [loop.death_registered for loop in started] == [True, True, False]


@pytest.mark.usefixtures("loops")
def test_a_burst_runs_once_and_a_stop_during_the_pause_ends_it() -> None:
    started: list[Loop] = []

    def make() -> Any:
        started.append(Loop("quit"))
        return started[-1]

    worker.work_until_stopped(make, burst=True)
    assert len(started) == 1

    worker._STOP.set()  # asked to stop before the loop ends on its own
    worker.work_until_stopped(make)
    assert len(started) == 2
