"""Run the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, without Docker or a GPU.

The production repository (``model_repository/``) targets the NGC Triton image and its native
ONNX Runtime backend. The wheel's server has no such backend, only the python backend, so
``render_repository`` turns each model into a python-backend model with the same name, versions,
batching and I/O contract whose ``model.py`` runs the version's ``model.onnx`` with ONNX Runtime.
The local stack renders it without the dynamic batcher (settings.triton_local_dynamic_batching):
on this backend the batcher cost throughput at every size measured.

Layout under ``home`` (``MEDTRIAGE_HOME``, default ``<repo>/.medtriage``)::

    triton/pytriton/          the wheel, installed --no-deps (its numpy<2 pin stays out of the app)
    triton/stub-venv/         a venv (no pip) whose site-packages hold numpy<2 + onnxruntime for
                              the backend stub's embedded Python; found through PATH, see below
    triton/backends/python/   libtriton_python.so, triton_python_backend_utils.py, the stub
    triton/.installed         marker: a second install_runtime() is a no-op
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx

from orchestrator.inference.local_triton.install import (
    TritonRuntimeError,
    backend_dir,
    install_runtime,
    runtime_dir,
    stub_venv_dir,
    tritonserver_binary,
)
from orchestrator.inference.local_triton.render import (
    DEFAULT_INSTANCE_COUNT,
    DEFAULT_ORT_THREADS,
    render_repository,
)

# Cold start of tritonserver with two small ONNX models is ~3-6 s on 2 cores; leave room for a
# busy CI machine and for the stub processes' imports (numpy + onnxruntime per instance).
START_TIMEOUT_S = 120.0
# After SIGTERM Triton drains in-flight requests and unloads models; 30 s is its own default
# --exit-timeout-secs, after which we SIGKILL.
STOP_TIMEOUT_S = 30.0
# Pause between /v2/health/ready polls while starting.
READY_POLL_INTERVAL_S = 0.2
# One health probe must not hang the start loop if the port accepts but never answers.
READY_PROBE_TIMEOUT_S = 2.0
# Lines of the server log quoted in an error when start fails.
LOG_TAIL_LINES = 40

LOOPBACK = "127.0.0.1"
# glog's error lines ("E1128 16:20:08.009314 9481 model_lifecycle.cc:642] ...") say why a model
# failed; the tail of the log is mostly the status tables printed on exit.
_ERROR_LINE = re.compile(r"^E\d{4} ")

ModelControl = Literal["none", "explicit"]


# --------------------------------------------------------------------------------------------
# process


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports the OS says are free now.

    All sockets stay open until every port is picked, so the OS cannot hand out one twice;
    another process may still take one before Triton binds it (Triton then exits at start).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def server_env(home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: its own libraries, libpython, and the stub's packages."""
    env = dict(os.environ if base is None else base)
    libs = [
        str(runtime_dir(home) / "pytriton" / "nvidia_pytriton.libs"),
        # The python backend stub links libpython3.X.so; a venv has none of its own.
        str(sysconfig.get_config_var("LIBDIR")),
    ]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub's embedded Python resolves "python3" on PATH to find its prefix (it ignores
    # PYTHONPATH), so the stub venv must come first: with the app's venv or a base interpreter
    # holding numpy 2 there instead, every response would be an empty tensor and no error.
    env["PATH"] = os.pathsep.join([str(stub_venv_dir(home) / "bin"), env.get("PATH", "")])
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


class TritonProcess:
    """One ``tritonserver`` process on loopback ports, logging to ``log_file``.

    ``with TritonProcess(...) as triton:`` starts it and waits until ready, and stops it on exit.
    """

    def __init__(
        self,
        home: Path,
        model_repository: Path,
        log_file: Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        model_control: ModelControl = "none",
        load_models: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        address: str = LOOPBACK,
    ) -> None:
        if model_control not in ("none", "explicit"):
            raise ValueError(f"model_control must be 'none' or 'explicit', not {model_control!r}")
        if load_models and model_control != "explicit":
            raise ValueError("load_models needs model_control='explicit'")
        self.home = home.resolve()
        self.model_repository = model_repository.resolve()
        self.log_file = log_file
        spare = iter(free_ports(3))
        self.grpc_port = grpc_port or next(spare)
        self.http_port = http_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.model_control: ModelControl = model_control
        self.load_models = tuple(load_models or ())
        self.extra_args = tuple(extra_args)
        self.address = address
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def _client_host(self) -> str:
        # A server bound to every interface is still reached on loopback from here.
        return LOOPBACK if self.address == "0.0.0.0" else self.address

    @property
    def grpc_url(self) -> str:
        """``host:port``, as ``tritonclient.grpc.InferenceServerClient(url=...)`` takes it."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus scrape URL (``.../metrics``)."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            str(tritonserver_binary(self.home)),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir(self.home)}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            "--log-verbose=0",
        ]
        cmd += [f"--load-model={name}" for name in self.load_models]
        return cmd + list(self.extra_args)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> TritonProcess:
        """Start the server and wait until ``/v2/health/ready``; raise with the log tail if not."""
        if self.is_running:
            return self
        binary = tritonserver_binary(self.home)
        if not binary.is_file():
            raise TritonRuntimeError(f"{binary} not found; run install_runtime({self.home}) first")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            # Own session: a terminal's Ctrl-C reaches us, not the server mid-request, and stop()
            # can kill the backend stubs with the server as one process group.
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env(self.home),
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/health/ready"
        with httpx.Client(timeout=READY_PROBE_TIMEOUT_S) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise TritonRuntimeError(
                        f"tritonserver exited with {code} while starting; {self.log_summary()}"
                    )
                try:
                    if client.get(url).status_code == httpx.codes.OK:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TritonRuntimeError(
                        f"tritonserver not ready after {timeout_s:.0f} s; {self.log_summary()}"
                    )
                time.sleep(READY_POLL_INTERVAL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code, or None if never started."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        # Backend stubs normally exit with the server; a stray one would hold memory and ports.
        _kill_group(proc.pid)
        return proc.returncode

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log (all of it for 0)."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def log_summary(self) -> str:
        """Triton's error lines, then the log's tail, for an exception message."""
        errors = [line for line in self.log_tail(lines=0).splitlines() if _ERROR_LINE.match(line)]
        parts = [f"errors in {self.log_file}:", *errors[-LOG_TAIL_LINES:]] if errors else []
        parts += [f"{self.log_file} ends with:", self.log_tail()]
        return "\n".join(parts)

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    # ProcessLookupError: the group is already gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# serve (for the CLI)

MEDTRIAGE_HOME_ENV = "MEDTRIAGE_HOME"
# Triton's standard ports, so clients and Prometheus configured for the NGC image work unchanged.
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002


def default_home(root: Path | None = None) -> Path:
    """``$MEDTRIAGE_HOME``, else ``<root or cwd>/.medtriage``."""
    value = os.environ.get(MEDTRIAGE_HOME_ENV)
    if value:
        return Path(value)
    return (root or Path.cwd()) / ".medtriage"


def prepare(
    home: Path,
    src_repo: Path,
    workdir: Path,
    *,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    ort_threads: int = DEFAULT_ORT_THREADS,
) -> Path:
    """Install the runtime if needed and render ``src_repo``; returns the rendered repository."""
    install_runtime(home)
    return render_repository(
        src_repo,
        workdir / "model_repository",
        instance_count=instance_count,
        ort_threads=ort_threads,
    )


def serve(
    home: Path,
    src_repo: Path,
    workdir: Path,
    *,
    grpc_port: int = DEFAULT_GRPC_PORT,
    http_port: int = DEFAULT_HTTP_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    address: str = LOOPBACK,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    ort_threads: int = DEFAULT_ORT_THREADS,
    model_control: ModelControl = "none",
    start_timeout_s: float = START_TIMEOUT_S,
) -> int:
    """Install, render and run tritonserver until SIGTERM/SIGINT or until it dies.

    Returns 0 after a requested shutdown, else the server's exit code. Call from the main thread
    (it installs signal handlers).
    """
    repo = prepare(home, src_repo, workdir, instance_count=instance_count, ort_threads=ort_threads)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    triton = TritonProcess(
        home,
        repo,
        workdir / "tritonserver.log",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        model_control=model_control,
        address=address,
    )
    try:
        triton.start(start_timeout_s)
        print(
            f"tritonserver ready: grpc {triton.grpc_url}  http {triton.http_url}  "
            f"metrics {triton.metrics_url}  log {triton.log_file}",
            flush=True,
        )
        while not stop.wait(READY_POLL_INTERVAL_S):
            if not triton.is_running:
                code = triton.stop()
                print(f"tritonserver exited ({code}); {triton.log_summary()}", file=sys.stderr)
                return code or 1
        triton.stop()
        return 0
    finally:
        triton.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.inference.local_triton.process`` until the ``medtriage triton`` CLI wraps serve()."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--workdir", type=Path, default=None, help="default HOME/triton/run")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--address", default=LOOPBACK)
    parser.add_argument("--instances", type=int, default=DEFAULT_INSTANCE_COUNT)
    parser.add_argument("--ort-threads", type=int, default=DEFAULT_ORT_THREADS)
    args = parser.parse_args(argv)
    return serve(
        args.home,
        args.repo,
        args.workdir or runtime_dir(args.home) / "run",
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        address=args.address,
        instance_count=args.instances,
        ort_threads=args.ort_threads,
    )


if __name__ == "__main__":
    sys.exit(main())
