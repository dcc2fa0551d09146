"""TLS for the API: uvicorn serves HTTPS when given a certificate, TLS 1.2 or newer only.

PostgreSQL and Redis take TLS through their URLs (``...?sslmode=verify-full&sslrootcert=``,
``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=``), so no code is needed for them.
"""

from __future__ import annotations

import ssl
from typing import Any

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
        ssl_certfile=certfile or None,
        ssl_keyfile=keyfile or None,
    )
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = MINIMUM_TLS
    uvicorn.Server(config).run()
