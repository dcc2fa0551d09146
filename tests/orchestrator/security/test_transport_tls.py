"""TLS to the platform's own dependencies, with a CA made by the test:

- the Triton gRPC clients (TritonInference, TritonControl) through settings: a gRPC server
  speaking Triton's protocol over TLS (a stand-in answering ServerReady; the session's real
  Triton serves plaintext and is shared) is reached with the CA, refused without it, and
  mutual TLS works with the client certificate only;
- Redis through ``rediss://`` URLs (no code of ours needed): a real redis-server started
  here with TLS only, reached by the queue's connection helpers;
- PostgreSQL through ``sslmode=verify-full&sslrootcert=...`` in the database URL (libpq): a
  real PostgreSQL cluster made here (initdb) that accepts TLS connections only, migrated and
  used through the platform's pool.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.grpc import service_pb2, service_pb2_grpc

from orchestrator.cli.stack import free_port
from orchestrator.inference.client import TritonInference
from orchestrator.inference.model_control import TritonControl
from orchestrator.queue import jobs as jobqueue
from orchestrator.security.tls import GrpcTls
from orchestrator.settings import WorkerSettings
from orchestrator.store.db import connect_pool, upgrade

REDIS_START_TIMEOUT_S = 10.0
POSTGRES_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _make_pki(folder: Path, label: str) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} test CA"))
        .issuer_name(_name(f"{label} test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert, key

    server, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = leaf("medtriage-worker", ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "client.pem").write_bytes(client.public_bytes(pem))
    return Pki(
        folder / "ca.pem",
        folder / "server.pem",
        _write_key(folder / "server.key", server_key),
        folder / "client.pem",
        _write_key(folder / "client.key", client_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"), "medtriage")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("other"), "stranger")


class _Ready(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's gRPC service, as far as readiness and the repository index go."""

    def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's naming
        return service_pb2.ServerReadyResponse(ready=True)

    def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        model = service_pb2.RepositoryIndexResponse.ModelIndex(
            name="triage", version="1", state="READY"
        )
        return service_pb2.RepositoryIndexResponse(models=[model])


def _grpc_server(pki: Pki, *, mutual: bool) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Ready(), server)
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() if mutual else None,
        require_client_auth=mutual,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls_triton(pki: Pki) -> Iterator[str]:
    server, url = _grpc_server(pki, mutual=False)
    yield url
    server.stop(grace=None)


@pytest.fixture(scope="module")
def mtls_triton(pki: Pki) -> Iterator[str]:
    server, url = _grpc_server(pki, mutual=True)
    yield url
    server.stop(grace=None)


def _ready(url: str, tls: GrpcTls | None) -> bool:
    client = TritonInference(url, tls=tls)
    try:
        return client.is_ready()
    finally:
        client.close()


def test_grpc_tls_from_settings(tls_triton: str, pki: Pki, other_ca: Pki) -> None:
    settings = WorkerSettings(
        triton_grpc_url=tls_triton, triton_grpc_tls=True, triton_grpc_ca_file=str(pki.ca)
    )
    tls = GrpcTls.from_settings(settings)
    assert tls == GrpcTls(True, str(pki.ca))
    assert _ready(settings.triton_grpc_url, tls) is True
    # The model-control client takes the same settings.
    index = TritonControl(tls_triton, tls=tls).index()
    assert [(m["name"], m["state"]) for m in index] == [("triage", "READY")]
    # Plaintext to a TLS endpoint, or a server signed by a CA we do not trust: refused.
    assert _ready(tls_triton, None) is False
    assert _ready(tls_triton, GrpcTls(True, str(other_ca.ca))) is False


def test_grpc_mutual_tls(mtls_triton: str, pki: Pki) -> None:
    with_cert = GrpcTls(True, str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert _ready(mtls_triton, with_cert) is True
    assert _ready(mtls_triton, GrpcTls(True, str(pki.ca))) is False
    with pytest.raises(ValueError, match="needs both"):
        GrpcTls(True, str(pki.ca), cert_file=str(pki.client_cert)).client_kwargs()
    assert GrpcTls().client_kwargs() == {}


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/apt-packages.txt)"
    port = free_port()
    work = tmp_path_factory.mktemp("redis-tls")
    proc = subprocess.Popen(
        [
            binary,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(pki.server_cert),
            "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", "no",
            "--tls-protocols", "TLSv1.2 TLSv1.3",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(work),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki.ca}&ssl_cert_reqs=required"
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        assert proc.poll() is None, "redis-server with TLS did not start"
        try:
            jobqueue.connect(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server with TLS did not answer"
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_over_tls(tls_redis: int, pki: Pki, other_ca: Pki) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={pki.ca}&ssl_cert_reqs=required"
    api_side, worker_side = jobqueue.connect(url), jobqueue.connect_worker(url)
    api_side.set("medtriage-tls-check", b"sealed in transit")
    assert worker_side.get("medtriage-tls-check") == b"sealed in transit"
    # Plaintext to the TLS port, or a server signed by a CA we do not trust: refused.
    with pytest.raises(redis.ConnectionError):
        jobqueue.connect(f"redis://127.0.0.1:{tls_redis}/0").ping()
    stranger = f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={other_ca.ca}&ssl_cert_reqs=required"
    with pytest.raises(redis.ConnectionError):
        jobqueue.connect(stranger).ping()


def _postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, f"PostgreSQL's {name} is not installed (the CI machine's postgresql package)"
    return str(found[-1])


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[int]:
    """A throwaway PostgreSQL cluster that takes TLS connections only (pg_hba: hostssl)."""
    work = Path(tempfile.mkdtemp(prefix="medtriage-pg-tls-"))
    data = work / "data"
    shutil.copy(pki.server_cert, work / "server.pem")
    shutil.copy(pki.server_key, work / "server.key")
    os.chmod(work / "server.key", 0o600)
    # initdb and postgres refuse to run as root: as root, run them as the postgres user.
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        user = {"user": "postgres", "group": "postgres", "env": {**os.environ, "HOME": str(work)}}
        for path in (work, work / "server.pem", work / "server.key"):
            shutil.chown(path, "postgres", "postgres")
    subprocess.run(
        [_postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        **user,
    )
    (data / "pg_hba.conf").write_text(
        "hostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 reject\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            _postgres_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(work),
            "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on",
            "-c", f"ssl_cert_file={work / 'server.pem'}",
            "-c", f"ssl_key_file={work / 'server.key'}",
            "-c", "fsync=off", "-c", "shared_buffers=16MB",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        **user,
    )  # fmt: skip
    url = _pg_url(port, pki.ca)
    deadline = time.monotonic() + POSTGRES_START_TIMEOUT_S
    while True:
        assert proc.poll() is None, "PostgreSQL with TLS did not start"
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "PostgreSQL with TLS did not answer"
            time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)


def _pg_url(port: int, ca: Path, mode: str = "verify-full") -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode={mode}&sslrootcert={ca}"


def test_postgresql_over_tls(tls_postgres: int, pki: Pki, other_ca: Pki) -> None:
    url = _pg_url(tls_postgres, pki.ca)
    # The platform's own paths: migrations, then the pool the API and workers use.
    assert "0001_initial.sql" in upgrade(url)
    pool = connect_pool(url, max_size=2)
    pool.open(wait=True)
    try:
        with pool.connection() as conn:
            ssl = conn.execute(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert ssl is not None and ssl[0] is True, ssl
            assert ssl[1] in ("TLSv1.2", "TLSv1.3")
            tenant = conn.execute(
                "INSERT INTO tenants (name) VALUES ('tls') RETURNING name"
            ).fetchone()
        assert tenant == ("tls",)
    finally:
        pool.close()
    # Plaintext (refused by the server), or a server signed by a CA we do not trust.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_pg_url(tls_postgres, pki.ca, "disable"), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_pg_url(tls_postgres, other_ca.ca), connect_timeout=5)
