"""Misbehaving 'decoders' for tests/preprocess/test_sandbox.py, importable by the sandbox's
spawned child (the test puts this folder on sys.path, which the child inherits)."""

from __future__ import annotations

import os
import time


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def abort() -> None:
    os.abort()  # SIGABRT, as a crashing C codec would


def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 2**20)
    return len(block)


def pid() -> int:
    return os.getpid()


def _explode(child_pid: int) -> None:
    if os.getpid() != child_pid:
        raise RuntimeError("this answer cannot be read here")


class _Unreadable:
    """Pickles in the child; unpickling it anywhere else raises."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (_explode, (os.getpid(),))


def unreadable_answer() -> _Unreadable:
    return _Unreadable()
