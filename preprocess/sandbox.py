"""Decoding where a bad file cannot take the worker down.

Codecs are C code fed with bytes from outside: a crafted file may crash one, loop in it, or
ask for more memory than the machine has. ``DecodeSandbox`` runs read → check → preprocess in
one long-lived child process (spawned, so it shares no locks or gRPC threads with the worker)
under an address-space limit, and waits for it at most ``timeout_s``. A crash, a kill by the
memory limit or a timeout costs that one instance (a ``PreprocessError`` with its own
category) and a fresh child for the next; the worker process carries on.

Only pixel data that a codec decodes needs it: uncompressed pixel data (the three native
transfer syntaxes) is read by numpy straight from the file's bytes after the same checks, so
``needs_codec`` tells the caller which files may be decoded in-process (``decode`` with
``native_only``), which saves the round trip to the child (CT slices: 10-25 % throughput).

The child is reused between files: spawning costs ~0.5 s. Originals larger than
``SHARED_MIN_BYTES`` reach the child through a shared-memory buffer the sandbox keeps (one
copy in, no pickling through the pipe: for a 10 MB radiograph that was ~25 ms of the ~32 ms a
sandboxed decode took); the tensor and the JPEG come back pickled (well under 1 MB).
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar, cast

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from preprocess.errors import DecoderCrashedError, DecodeTimeoutError, ImageTooLargeError
from preprocess.pipeline import Preprocessed, Target, preprocess_for
from preprocess.reader import check_image, read_dicom

T = TypeVar("T")

# Originals at least this large go through the shared buffer rather than the pipe.
SHARED_MIN_BYTES = 256 * 1024
# The shared buffer grows to the next multiple of this (fewer re-creations as sizes vary).
_SHARED_STEP_BYTES = 4 * 2**20
# The child's attachment to the parent's current buffer, by name (at most one entry).
_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


# Transfer syntaxes whose pixel data no codec decodes (numpy reads it as it is).
NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})


class CodecNeeded(Exception):
    """``decode(native_only=True)`` met pixel data a codec would decode: use the sandbox."""


def needs_codec(transfer_syntax_uid: str | None) -> bool:
    """True unless the file declares one of the native (uncompressed) transfer syntaxes;
    an unknown or missing one counts as needing a codec."""
    return transfer_syntax_uid not in NATIVE_SYNTAXES


def _limit_memory(memory_mb: int) -> None:
    if memory_mb > 0:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def decode(
    data: bytes,
    targets: Sequence[Target],
    max_pixels: int,
    preview_max_size: int,
    preview_quality: int,
    *,
    native_only: bool = False,
) -> Preprocessed:
    """What the child runs (also usable in-process): bytes → one tensor per target + preview.
    ``native_only`` (in-process use) raises ``CodecNeeded`` before decoding pixel data that
    is not in a native transfer syntax."""
    try:
        ds = read_dicom(data)
        if native_only and needs_codec(ds.file_meta.get("TransferSyntaxUID")):
            raise CodecNeeded(str(ds.file_meta.get("TransferSyntaxUID", "")))
        check_image(ds, max_pixels=max_pixels)
        return preprocess_for(
            ds, targets, preview_max_size=preview_max_size, preview_quality=preview_quality
        )
    except MemoryError:
        raise ImageTooLargeError("decoding needs more memory than the decoder may use") from None


def _view(shm: shared_memory.SharedMemory) -> memoryview:
    view = shm.buf
    assert view is not None, "shared buffer already closed"
    return view


def decode_shared(
    name: str,
    size: int,
    targets: Sequence[Target],
    max_pixels: int,
    preview_max_size: int,
    preview_quality: int,
) -> Preprocessed:
    """``decode`` of the first ``size`` bytes of the parent's shared buffer ``name`` (child side)."""
    shm = _ATTACHED.get(name)
    if shm is None:
        for old in _ATTACHED.values():
            old.close()
        _ATTACHED.clear()
        shm = _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    data = bytes(_view(shm)[:size])
    return decode(data, targets, max_pixels, preview_max_size, preview_quality)


def _serve(conn: Connection, memory_mb: int) -> None:
    """The child's loop: (fn, args) in, (True, result) or (False, exception) out."""
    _limit_memory(memory_mb)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed its end or went away
        try:
            reply: tuple[bool, Any] = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            reply = (False, exc)
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result or exception
            conn.send((False, RuntimeError(f"decoder result could not be returned: {exc!r}")))


class DecodeSandbox:
    """One spawned child, spoken to over a pipe: the caller sends a call and waits for the
    answer at most ``timeout_s``."""

    def __init__(self, *, memory_mb: int, timeout_s: float) -> None:
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._shared: shared_memory.SharedMemory | None = None
        # One call in the child at a time, whichever thread asks (the pipe and the shared
        # buffer carry one file at a time).
        self._lock = threading.RLock()

    def _child(self) -> Connection:
        if self._conn is None or self._process is None or not self._process.is_alive():
            self._discard()
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=_serve, args=(child, self.memory_mb), name="medtriage-decoder", daemon=True
            )
            process.start()
            child.close()
            self._process, self._conn = process, parent
        return self._conn

    def run(
        self,
        data: bytes,
        targets: Sequence[Target],
        *,
        max_pixels: int,
        preview_max_size: int,
        preview_quality: int,
    ) -> Preprocessed:
        """Preprocess one file in the child; raise ``PreprocessError`` on any failure."""
        limits = (max_pixels, preview_max_size, preview_quality)
        if len(data) < SHARED_MIN_BYTES:
            return self.call(decode, data, targets, *limits)
        with self._lock:
            shm = self._shared_buffer(len(data))
            _view(shm)[: len(data)] = data
            return self.call(decode_shared, shm.name, len(data), targets, *limits)

    def _shared_buffer(self, size: int) -> shared_memory.SharedMemory:
        """The buffer for originals, replaced by a larger one when ``size`` does not fit. One
        file is in the child at a time (``call`` waits), so the buffer is never overwritten
        while the child reads it."""
        if self._shared is None or self._shared.size < size:
            self._release_shared()
            step = _SHARED_STEP_BYTES
            self._shared = shared_memory.SharedMemory(create=True, size=-(-size // step) * step)
        return self._shared

    def _release_shared(self) -> None:
        shm, self._shared = self._shared, None
        if shm is not None:
            shm.close()
            shm.unlink()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child (``fn`` must be importable there), within the limits."""
        with self._lock:
            return self._call(fn, *args)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._child()
        try:
            conn.send((fn, args))
            if not conn.poll(self.timeout_s):
                self._discard()
                raise DecodeTimeoutError(
                    f"decoding took longer than {self.timeout_s:g} s and was stopped"
                )
            ok, value = conn.recv()
        except (EOFError, OSError):
            self._discard()
            raise DecoderCrashedError(
                "the decoder process died on this file (a codec crash or the "
                f"{self.memory_mb} MB memory limit)"
            ) from None
        except BaseException:
            # Interrupted between asking and reading the answer (a signal's exception, an
            # answer that does not unpickle): the child's answer would be read by the next
            # call, or block it. A fresh child instead.
            self._discard()
            raise
        if ok:
            return cast(T, value)
        if isinstance(value, MemoryError):
            raise ImageTooLargeError(f"decoding needs more than the decoder's {self.memory_mb} MB")
        raise value

    @property
    def pid(self) -> int | None:
        """The current child's pid (None before the first file or after a discard)."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def _discard(self) -> None:
        process, self._process = self._process, None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)

    def close(self) -> None:
        with self._lock:
            self._discard()
            self._release_shared()
