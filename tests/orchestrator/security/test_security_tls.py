"""The API over TLS (the real `medtriage api` process): a CA made by this test signs the
server's certificate; clients that trust it connect, TLS below 1.2 and plain HTTP do not."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.cli.stack import free_port

pytestmark = [
    pytest.mark.integration,
    # The point of the test is to offer deprecated protocols.
    pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning"),
]

START_TIMEOUT_S = 60.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_pki(folder: Path) -> tuple[Path, Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("medtriage test CA"))
        .issuer_name(_name("medtriage test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
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
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def tls_api(
    settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = _make_pki(folder)
    port = free_port()
    env = {
        **os.environ,
        **settings_env,
        "MEDTRIAGE_PORT": str(port),
        "MEDTRIAGE_TLS_CERTFILE": str(cert),
        "MEDTRIAGE_TLS_KEYFILE": str(key),
    }
    log = open(folder / "api.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "api"], env=env, stdout=log, stderr=log
    )
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert proc.poll() is None, (folder / "api.log").read_text()
            try:
                httpx.get(f"{url}/healthz", verify=str(ca), timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "TLS API did not start"
                time.sleep(0.2)
        yield url, ca
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def _handshake(port: int, version: ssl.TLSVersion, ca: Path) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.minimum_version = version
    ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer old protocols at all
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


def test_tls_serves_with_the_test_ca(tls_api: tuple[str, Path]) -> None:
    url, ca = tls_api
    r = httpx.get(f"{url}/healthz", verify=str(ca))
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/studies", verify=str(ca)).status_code == 401
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")  # a client that does not trust the test CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https", "http") + "/healthz", timeout=3)  # no plain HTTP


def test_tls_below_1_2_is_refused(tls_api: tuple[str, Path]) -> None:
    url, ca = tls_api
    port = int(url.rsplit(":", 1)[1])
    assert _handshake(port, ssl.TLSVersion.TLSv1_2, ca) == "TLSv1.2"
    assert _handshake(port, ssl.TLSVersion.TLSv1_3, ca) == "TLSv1.3"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError):
            _handshake(port, old, ca)
