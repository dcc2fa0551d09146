"""Real servers a fault test (or a soak run) owns, so it can kill and restart them.

Never the machine's shared PostgreSQL or Redis: each class starts its own server on a free
loopback port in a temporary directory and stops it by PID.

- ``RedisServer``: redis-server with persistence off; ``restart()`` loses every key, as a
  restarted production Redis of ours does.
- ``PostgresServer``: initdb + pg_ctl from the Debian packages (run as the ``postgres``
  user, since initdb refuses root); ``restart()`` keeps the data (a crash and recovery).
- ``MotoS3``: moto's S3 server, reached through ``TcpProxy`` so the store can be made
  unreachable (connections refused) and reachable again without losing its objects.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from orchestrator.cli.stack import free_port

# How long a server may take to accept connections after it is started.
START_TIMEOUT_S = 30.0
# Grace between SIGTERM and SIGKILL when stopping a server.
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.05
_PROXY_BUFFER = 65536


def wait_port(port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(_POLL_S)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir)]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """SIGKILL and start again on the same port: every key is gone."""
        self.kill()
        self.start()

    def stop(self) -> None:
        _stop(self.proc)


class PostgresServer:
    USER = "postgres"

    def __init__(self) -> None:
        # Its own directory right under the temp root: the server runs as ``postgres`` and
        # must reach it, and pytest keeps resetting its own temp root to mode 0700.
        self.dir = Path(tempfile.mkdtemp(prefix="medtriage-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin = Path(found[-1])

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        user = pwd.getpwnam(self.USER)
        done = subprocess.run(
            args,
            check=False,
            capture_output=True,
            user=user.pw_uid if os.geteuid() == 0 else None,
            group=user.pw_gid if os.geteuid() == 0 else None,
            cwd="/",
        )
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(args[0]).name} exited {done.returncode}: {err}")

    def start(self) -> PostgresServer:
        if not self.data.exists():
            if os.geteuid() == 0:
                user = pwd.getpwnam(self.USER)
                os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--no-sync",
            )  # fmt: skip
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"),
            "-o", opts, "-w", "-t", str(int(START_TIMEOUT_S)), "start",
        )  # fmt: skip
        return self

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); its backends exit when they notice."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(_POLL_S)

    def restart(self, down_s: float = 0.0) -> None:
        """Crash it, stay down ``down_s``, start again (crash recovery keeps the data)."""
        self.stop(mode="immediate")
        time.sleep(down_s)
        self.start()

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")

    def remove(self) -> None:
        """Stop it and delete its data directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpProxy:
    """A loopback TCP forwarder that can refuse connections (``down``) and accept again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        """Close the listener and every open connection: clients see refused/reset."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_PROXY_BUFFER):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class MotoS3:
    """moto's S3 server behind a TcpProxy; ``endpoint_url`` points at the proxy."""

    BUCKET = "medtriage-faults"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.server_port = free_port()
        self.proxy = TcpProxy(self.server_port)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def storage_url(self) -> str:
        return f"s3://{self.BUCKET}/objects"

    def start(self) -> MotoS3:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        log = open(self.dir / "moto.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.server_port)], stdout=log, stderr=log
        )
        wait_port(self.server_port)
        self.proxy.up()
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=self.BUCKET)
        return self

    def stop(self) -> None:
        self.proxy.down()
        _stop(self.proc)
