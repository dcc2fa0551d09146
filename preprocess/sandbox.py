"""Decoding where a bad file cannot take the worker down.

Codecs are C code fed with bytes from outside: a crafted file may crash one, loop in it, or
ask for more memory than the machine has. ``DecodeSandbox`` runs read → check → preprocess in
one long-lived child process (spawned, so it shares no locks or gRPC threads with the worker)
under an address-space limit, and waits for it at most ``timeout_s``. A crash, a kill by the
memory limit or a timeout costs that one instance (a ``PreprocessError`` with its own
category) and a fresh child for the next; the worker process carries on.

The child is reused between files: spawning costs ~0.5 s, the per-file cost is pickling the
original in and the tensor and JPEG out (a few ms for a 10 MB radiograph).
"""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from preprocess.errors import DecoderCrashedError, DecodeTimeoutError, ImageTooLargeError
from preprocess.pipeline import Preprocessed, PreprocessSpec, preprocess
from preprocess.reader import check_image, read_dicom

T = TypeVar("T")


def _limit_memory(memory_mb: int) -> None:
    if memory_mb > 0:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def decode(
    data: bytes,
    spec: PreprocessSpec,
    shape: tuple[int, int, int],
    max_pixels: int,
    preview_max_size: int,
    preview_quality: int,
) -> Preprocessed:
    """What the child runs (also usable in-process): bytes → model tensor + preview."""
    try:
        ds = read_dicom(data)
        check_image(ds, max_pixels=max_pixels)
        return preprocess(
            ds, spec, shape, preview_max_size=preview_max_size, preview_quality=preview_quality
        )
    except MemoryError:
        raise ImageTooLargeError("decoding needs more memory than the decoder may use") from None


class DecodeSandbox:
    def __init__(self, *, memory_mb: int, timeout_s: float) -> None:
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=self._context,
                initializer=_limit_memory,
                initargs=(self.memory_mb,),
            )
        return self._pool

    def run(
        self,
        data: bytes,
        spec: PreprocessSpec,
        shape: tuple[int, int, int],
        *,
        max_pixels: int,
        preview_max_size: int,
        preview_quality: int,
    ) -> Preprocessed:
        """Preprocess one file in the child; raise ``PreprocessError`` on any failure."""
        return self.call(decode, data, spec, shape, max_pixels, preview_max_size, preview_quality)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child (``fn`` must be importable there), within the limits."""
        future = self._executor().submit(fn, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._discard()
            raise DecodeTimeoutError(
                f"decoding took longer than {self.timeout_s:g} s and was stopped"
            ) from None
        except BrokenProcessPool:
            self._discard()
            raise DecoderCrashedError(
                "the decoder process died on this file (a codec crash or the "
                f"{self.memory_mb} MB memory limit)"
            ) from None
        except MemoryError:
            raise ImageTooLargeError(
                f"decoding needs more than the decoder's {self.memory_mb} MB"
            ) from None

    @property
    def pid(self) -> int | None:
        """The current child's pid (None before the first file or after a discard)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    def _discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
