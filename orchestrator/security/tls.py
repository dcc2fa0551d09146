"""TLS: the API serves HTTPS when given a certificate (TLS 1.2 or newer only); the Triton
gRPC client speaks TLS when the settings say so (``GrpcTls``; gRPC itself refuses anything
below TLS 1.2).

PostgreSQL and Redis take TLS through their URLs (``...?sslmode=verify-full&sslrootcert=``,
``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=``), so no code is needed for them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.settings import CommonSettings

# TLS 1.0/1.1 are deprecated (RFC 8996); anything older is refused at the handshake.
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


def serve(app: Any, *, host: str, port: int, certfile: str = "", keyfile: str = "") -> None:
    import uvicorn

    if bool(certfile) != bool(keyfile):
        raise ValueError("TLS needs both MEDTRIAGE_TLS_CERTFILE and MEDTRIAGE_TLS_KEYFILE")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        # The access log prints full URLs; ours carry only opaque ids, but keep it quiet.
        access_log=False,
        # X-Forwarded-For is believed only from MEDTRIAGE_TRUSTED_PROXIES (api/origin.py),
        # not from whoever connects over loopback (uvicorn's default).
        proxy_headers=False,
        ssl_certfile=certfile or None,
        ssl_keyfile=keyfile or None,
    )
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = MINIMUM_TLS
    uvicorn.Server(config).run()


@dataclass(frozen=True)
class GrpcTls:
    """How the Triton gRPC clients connect: plaintext, or TLS verified against ``ca_file``
    (empty: the system's roots), with a client certificate for mutual TLS if given."""

    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> GrpcTls:
        return cls(
            settings.triton_grpc_tls,
            settings.triton_grpc_ca_file,
            settings.triton_grpc_cert_file,
            settings.triton_grpc_key_file,
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tritonclient.grpc.InferenceServerClient``."""
        if not self.enabled:
            return {}
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError(
                "mutual TLS to Triton needs both MEDTRIAGE_TRITON_GRPC_CERT_FILE and"
                " MEDTRIAGE_TRITON_GRPC_KEY_FILE"
            )
        return {
            "ssl": True,
            "root_certificates": self.ca_file or None,
            "private_key": self.key_file or None,
            "certificate_chain": self.cert_file or None,
        }
