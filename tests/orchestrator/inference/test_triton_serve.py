"""`medtriage triton serve` (issue 16, item 13) with the real bundled tritonserver: SIGTERM,
and SIGINT even when started as a shell's background job (SIGINT ignored), stop the server
and wait for it: `serve` exits 0, the server process is gone and its ports are free."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from orchestrator.inference.local_triton.install import install_runtime, runtime_dir
from orchestrator.inference.local_triton.process import default_home, free_ports
from orchestrator.settings import REPO_ROOT

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
_POLL_S = 0.25


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Its own stack home (logs, rendered repository) sharing the installed runtime."""
    shared = default_home(REPO_ROOT)
    install_runtime(shared)
    path = tmp_path / "home"
    path.mkdir()
    (path / "triton").symlink_to(runtime_dir(shared), target_is_directory=True)
    return path


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ignore_sigint() -> None:
    # What a non-interactive shell does to a job started with '&'.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


CASES: dict[str, tuple[signal.Signals, Callable[[], None] | None]] = {
    "sigterm": (signal.SIGTERM, None),
    "sigint-background": (signal.SIGINT, _ignore_sigint),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_serve_stops_tritonserver_on_a_signal_and_frees_its_ports(home: Path, case: str) -> None:
    signum, preexec = CASES[case]
    grpc_port, http_port = free_ports(2)
    env = {
        **os.environ,
        "MEDTRIAGE_HOME": str(home),
        "MEDTRIAGE_TRITON_GRPC_URL": f"127.0.0.1:{grpc_port}",
        "MEDTRIAGE_TRITON_HTTP_URL": f"http://127.0.0.1:{http_port}",
    }
    log = (home / "serve.log").open("ab")
    serve = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "triton", "serve"],
        env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec,
    )  # fmt: skip
    server: int | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert serve.poll() is None, (home / "serve.log").read_text()[-2000:]
            with contextlib.suppress(httpx.TransportError):
                url = f"http://127.0.0.1:{http_port}/v2/health/ready"
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "tritonserver not ready"
            time.sleep(_POLL_S)
        (server,) = _children(serve.pid)
        serve.send_signal(signum)
        try:
            code = serve.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"`triton serve` did not stop on {signum.name} (status {code})"
        assert not _alive(server), "tritonserver still running after `triton serve` exited"
        assert _port_free(grpc_port) and _port_free(http_port)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        if server is not None and _alive(server):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server, signal.SIGKILL)  # its own session: stubs with it
        log.close()
