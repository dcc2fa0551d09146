"""The local stack on one machine: Triton (bundled binary), the API and N workers.

PostgreSQL and Redis are taken from settings; ``medtriage demo`` resolves them first
(configured, the machine's own, or embedded servers: ``cli/services.py``). Each
process logs to its own file under ``<home>/logs``; ``stop()`` ends them all, newest first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from orchestrator.inference.local_triton.install import install_runtime
from orchestrator.inference.local_triton.process import TritonProcess
from orchestrator.inference.local_triton.render import render_repository
from orchestrator.inference.specs import load_repository
from orchestrator.settings import CliSettings

# How long the API may take to answer /healthz after it is started.
API_START_TIMEOUT_S = 60.0
TRITON_START_TIMEOUT_S = 180.0
# Grace period between SIGTERM and SIGKILL when stopping a process.
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    def __init__(self, settings: CliSettings, *, workers: int | None = None) -> None:
        self.settings = settings
        self.workers = workers if workers is not None else settings.concurrency
        self.home = settings.home
        self.logs = self.home / "logs"
        self.triton: TritonProcess | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api_url = ""
        self.env: dict[str, str] = {}

    def start_triton(self) -> TritonProcess:
        install_runtime(self.home)
        rendered = render_repository(
            self.settings.model_repository,
            self.home / "triton-repository",
            dynamic_batching=self.settings.triton_local_dynamic_batching,
        )
        # Explicit model control, so `medtriage models load/unload` works on the local stack.
        self.triton = TritonProcess(
            self.home,
            rendered,
            self.logs / "triton.log",
            model_control="explicit",
            load_models=sorted(load_repository(self.settings.model_repository)),
        )
        self.triton.start(timeout_s=TRITON_START_TIMEOUT_S)
        return self.triton

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def start(self) -> LocalStack:
        self.logs.mkdir(parents=True, exist_ok=True)
        triton = self.triton or self.start_triton()
        port = self.settings.port if self.settings.port else free_port()
        self.env = {
            **os.environ,
            "MEDTRIAGE_DATABASE_URL": self.settings.database_url,
            "MEDTRIAGE_REDIS_URL": self.settings.redis_url,
            "MEDTRIAGE_STORAGE_URL": self.settings.storage_url,
            "MEDTRIAGE_TRITON_GRPC_URL": triton.grpc_url,
            "MEDTRIAGE_TRITON_HTTP_URL": triton.http_url,
            "MEDTRIAGE_MODEL_REPOSITORY": str(self.settings.model_repository),
            "MEDTRIAGE_HOME": str(self.home),
            "MEDTRIAGE_QUEUE_PREFIX": self.settings.queue_prefix,
            "MEDTRIAGE_PORT": str(port),
            "MEDTRIAGE_CONCURRENCY": "1",
        }
        self.api_url = f"http://127.0.0.1:{port}"
        api = self._spawn("api", "api")
        for i in range(self.workers):
            self._spawn(f"worker-{i}", "worker")
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while True:
            if api.poll() is not None:
                raise RuntimeError(f"API exited with {api.returncode}; see {self.logs / 'api.log'}")
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"API did not start; see {self.logs / 'api.log'}")
            time.sleep(_POLL_S)
        return self

    def wait_workers_ready(self, redis_url: str, timeout_s: float = 120.0) -> None:
        """Block until every worker has registered with RQ (it has warmed up)."""
        from rq import Queue, Worker

        from orchestrator.queue.jobs import connect

        redis = connect(redis_url)
        queue = Queue(self.settings.queue_name, connection=redis)
        deadline = time.monotonic() + timeout_s
        while len(Worker.all(queue=queue)) < self.workers:
            dead = [p for p in self.procs[1:] if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited; see {self.logs}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register in time")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def log_dir(home: Path) -> Path:
    return home / "logs"
