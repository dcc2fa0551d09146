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
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import venv
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from orchestrator.triton.config import (
    CONFIG_FILENAME,
    PREPROCESS_FILENAME,
    ModelConfigError,
    read_model_config,
    version_dirs,
)

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
# The stub imports numpy through triton_python_backend_utils; built against numpy 1.x, it answers
# every request with an EMPTY output tensor (and no error) when it finds numpy 2.
STUB_REQUIREMENTS = ("numpy<2", "onnxruntime")
# Bump when the layout under HOME/triton changes so old installs are rebuilt.
INSTALL_LAYOUT_VERSION = 2

# Generous: a cold install downloads ~55 MB (the wheel) + ~30 MB (numpy, onnxruntime).
PIP_TIMEOUT_S = 900.0
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

# Instances per model in the rendered repository. One stub process per instance; on a 2-core
# machine more than one mostly adds memory.
DEFAULT_INSTANCE_COUNT = 1
# ONNX Runtime intra-op threads per model instance. One thread per instance keeps N instances
# from oversubscribing the cores; batching a study's images into one request, not ORT threads,
# gives throughput.
DEFAULT_ORT_THREADS = 1
# Name of the config.pbtxt parameter model.py reads the thread count from.
ORT_THREADS_PARAMETER = "ort_intra_op_num_threads"

LOOPBACK = "127.0.0.1"
# glog's error lines ("E1128 16:20:08.009314 9481 model_lifecycle.cc:642] ...") say why a model
# failed; the tail of the log is mostly the status tables printed on exit.
_ERROR_LINE = re.compile(r"^E\d{4} ")
MODEL_TEMPLATE = Path(__file__).with_name("model.py.tmpl")
ONNX_FILENAME = "model.onnx"

ModelControl = Literal["none", "explicit"]


class TritonRuntimeError(RuntimeError):
    """Installing, rendering for or starting the local tritonserver failed."""


# --------------------------------------------------------------------------------------------
# install


def runtime_dir(home: Path) -> Path:
    return home / "triton"


def pytriton_dir(home: Path) -> Path:
    """The ``pytriton`` package inside the wheel install (holds ``tritonserver/``)."""
    return runtime_dir(home) / "pytriton" / "pytriton"


def tritonserver_binary(home: Path) -> Path:
    return pytriton_dir(home) / "tritonserver" / "bin" / "tritonserver"


def backend_dir(home: Path) -> Path:
    return runtime_dir(home) / "backends"


def stub_venv_dir(home: Path) -> Path:
    return runtime_dir(home) / "stub-venv"


def stub_site_dir(home: Path) -> Path:
    """site-packages of the stub's venv: numpy<2 and onnxruntime for model.py."""
    return stub_venv_dir(home) / "lib" / f"python{_python_minor()}" / "site-packages"


def _marker(home: Path) -> Path:
    return runtime_dir(home) / ".installed"


def _marker_content() -> str:
    return json.dumps(
        {
            "layout": INSTALL_LAYOUT_VERSION,
            "pytriton": PYTRITON_REQUIREMENT,
            "stub": list(STUB_REQUIREMENTS),
            "python": _python_minor(),
        },
        sort_keys=True,
    )


def _python_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def is_installed(home: Path) -> bool:
    marker = _marker(home)
    return marker.is_file() and marker.read_text() == _marker_content()


def install_runtime(home: Path, *, python: str = sys.executable) -> Path:
    """Install the bundled tritonserver and the python backend under ``home``; idempotent.

    Returns the backend directory to pass as ``--backend-directory``. A completed install is
    recorded in a marker file, so a second call costs a file read.
    """
    home = home.resolve()
    if is_installed(home):
        return backend_dir(home)
    root = runtime_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    _pip(python, "--no-deps", "--target", root / "pytriton", PYTRITON_REQUIREMENT)
    _make_stub_venv(home)
    _pip(python, "--target", stub_site_dir(home), *STUB_REQUIREMENTS)
    _build_python_backend(home)
    _marker(home).write_text(_marker_content())
    return backend_dir(home)


def _pip(python: str, *args: str | Path) -> None:
    # --upgrade: replace a half-written --target from an interrupted earlier run instead of
    # leaving it beside the new one (pip --target otherwise warns and keeps the old directory).
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade"]
    cmd += [str(a) for a in args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise TritonRuntimeError(f"{' '.join(cmd)} took over {PIP_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        raise TritonRuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )


def _make_stub_venv(home: Path) -> None:
    # The stub embeds Python in isolated mode: it ignores PYTHONPATH and PYTHONHOME and finds
    # its prefix by looking up "python3" on PATH. A venv first on PATH therefore becomes the
    # stub's sys.prefix, with its own site-packages and WITHOUT the base interpreter's (which
    # may hold numpy 2). No pip inside: the app's pip fills it with --target, which is faster.
    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(stub_venv_dir(home))


def _build_python_backend(home: Path) -> None:
    server = pytriton_dir(home) / "tritonserver"
    src = server / "backends" / "python"
    stubs = server / "python_backend_stubs"
    stub = stubs / _python_minor() / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonRuntimeError(
            f"{PYTRITON_REQUIREMENT} has no python backend stub for Python {_python_minor()} "
            f"(it has: {', '.join(have) or 'none'}); run with one of those Python versions"
        )
    dest = backend_dir(home) / "python"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(src / name, dest / name)
    shutil.copy2(stub, dest / stub.name)
    (dest / stub.name).chmod(0o755)


# --------------------------------------------------------------------------------------------
# render


# Written into a rendered repository so a later render may replace it wholesale, and never a
# directory it did not make.
_RENDER_MARKER = ".medtriage-rendered"


def render_repository(
    src: Path,
    dest: Path,
    *,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    ort_threads: int = DEFAULT_ORT_THREADS,
    dynamic_batching: bool = True,
) -> Path:
    """Render the production repository ``src`` as a python-backend repository at ``dest``.

    Same models, versions, max_batch_size, dynamic batching (priorities, queue policy),
    version_policy, I/O contract and label files; each version's ``model.py`` runs its
    ``model.onnx`` with ONNX Runtime on CPU. ``dest`` is replaced if an earlier render made it.
    ``dynamic_batching=False`` drops the dynamic batcher (see ``to_python_backend``).
    """
    if instance_count < 1 or ort_threads < 1:
        raise ValueError("instance_count and ort_threads must be >= 1")
    models = sorted(p for p in src.iterdir() if (p / CONFIG_FILENAME).is_file())
    if not models:
        raise ModelConfigError(src, f"no model directories with a {CONFIG_FILENAME}")
    _prepare_dest(dest)
    template = MODEL_TEMPLATE.read_text(encoding="utf-8")
    model_py = _fill_template(template)
    for model_dir in models:
        _render_model(
            model_dir,
            dest / model_dir.name,
            model_py,
            instance_count,
            ort_threads,
            dynamic_batching,
        )
    (dest / _RENDER_MARKER).write_text(str(src.resolve()))
    return dest


def _prepare_dest(dest: Path) -> None:
    if dest.exists():
        if not (dest / _RENDER_MARKER).is_file() and any(dest.iterdir()):
            raise TritonRuntimeError(
                f"{dest} exists and was not rendered by medtriage; choose an empty directory"
            )
        shutil.rmtree(dest)
    dest.mkdir(parents=True)


def _fill_template(template: str) -> str:
    values = {
        "ONNX_FILENAME": ONNX_FILENAME,
        "THREADS_PARAMETER": ORT_THREADS_PARAMETER,
        "DEFAULT_THREADS": str(DEFAULT_ORT_THREADS),
    }
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    if "{{" in template:
        raise TritonRuntimeError(f"{MODEL_TEMPLATE} has an unfilled placeholder")
    return template


def _render_model(
    src: Path,
    dest: Path,
    model_py: str,
    instance_count: int,
    ort_threads: int,
    dynamic_batching: bool = True,
) -> None:
    config_path = src / CONFIG_FILENAME
    config = read_model_config(config_path)
    versions = version_dirs(src)
    if not versions:
        raise ModelConfigError(src, "no numeric version directories to serve")
    dest.mkdir()
    for version in versions:
        onnx = src / str(version) / ONNX_FILENAME
        if not onnx.is_file():
            raise ModelConfigError(
                onnx, "missing: the python-backend rendering serves ONNX models only"
            )
        # The whole version directory, not just the graph: readers of the rendered repository
        # find the same side files (model cards, calibration references) as in production.
        version_dest = dest / str(version)
        shutil.copytree(src / str(version), version_dest)
        (version_dest / "model.py").write_text(model_py, encoding="utf-8")
    for name in _side_files(config):
        if not (src / name).is_file():
            raise ModelConfigError(src / name, "named in config.pbtxt but missing")
        shutil.copy2(src / name, dest / name)
    if (src / PREPROCESS_FILENAME).is_file():
        shutil.copy2(src / PREPROCESS_FILENAME, dest / PREPROCESS_FILENAME)
    cpu_config = to_python_backend(
        config,
        instance_count=instance_count,
        ort_threads=ort_threads,
        dynamic_batching=dynamic_batching,
    )
    (dest / CONFIG_FILENAME).write_text(
        f"# Rendered by medtriage from {config_path.resolve()}; edit that file, not this one.\n"
        + text_format.MessageToString(cpu_config),
        encoding="utf-8",
    )


def _side_files(config: mc.ModelConfig) -> list[str]:
    return sorted({o.label_filename for o in config.output if o.label_filename})


def to_python_backend(
    config: mc.ModelConfig,
    *,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    ort_threads: int = DEFAULT_ORT_THREADS,
    dynamic_batching: bool = True,
) -> mc.ModelConfig:
    """A copy of a production ``ModelConfig`` for the python backend on CPU.

    Everything that is the model's contract (name, I/O, batching, version_policy, warmup) is kept;
    only how it executes changes. ``dynamic_batching=False`` drops the dynamic batcher: on this
    backend it cost throughput at every batch size and client count measured (benchmarks/
    README.md), and requests still carry their priority (Triton accepts and ignores it).
    """
    out = mc.ModelConfig()
    out.CopyFrom(config)
    out.backend = "python"
    # platform ("onnxruntime_onnx") would select the native backend, which the wheel lacks;
    # default_model_filename would make the python backend look for a script by that name.
    out.ClearField("platform")
    out.ClearField("default_model_filename")
    # GPU-only: TensorRT/CUDA execution accelerators, CUDA graphs, pinned-memory tuning.
    out.ClearField("optimization")
    out.ClearField("instance_group")
    out.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instance_count)
    out.parameters[ORT_THREADS_PARAMETER].string_value = str(ort_threads)
    if not dynamic_batching:
        out.ClearField("dynamic_batching")
    return out


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
    """``python -m orchestrator.triton.local`` until the ``medtriage triton`` CLI wraps serve()."""
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
