"""Settings per process kind, read from the environment (prefix ``MEDTRIAGE_``).

Each entry point builds its own settings object and passes it down; nothing imports a
settings global. Defaults describe the local stack on one machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# model_repository/ and samples/ as the wheel ships them (setup.py copies them in at build).
SHIPPED_DATA = Path(__file__).resolve().parent / "_data"


def data_dir(name: str) -> Path:
    """A top-level data folder (``model_repository``, ``samples``): the checkout's, else the
    copy an installed wheel carries."""
    checkout = REPO_ROOT / name
    return checkout if checkout.is_dir() else SHIPPED_DATA / name


def default_home() -> Path:
    """``<checkout>/.medtriage`` in a checkout; ``~/.medtriage`` for an installed wheel (never
    a folder inside site-packages)."""
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / ".medtriage"
    return Path.home() / ".medtriage"


# The local stack's own database on a machine's PostgreSQL (created if missing), so that no
# default ever lands in a shared database such as the CI machines' `test`.
LOCAL_DATABASE_NAME = "medtriage"
# Local development defaults: the services every machine of ours runs on loopback. The local
# stack (cli/services.py) starts embedded servers when nothing answers there.
DEFAULT_DATABASE_URL = f"postgresql://postgres@127.0.0.1:5432/{LOCAL_DATABASE_NAME}"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TRITON_GRPC_URL = "127.0.0.1:8001"


class CommonSettings(BaseSettings):
    """What every process needs to find the database, the queue, the store and Triton."""

    model_config = SettingsConfigDict(env_prefix="MEDTRIAGE_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # file:///abs/path  or  s3://bucket/prefix; empty = file://<home>/objects
    storage_url: str = ""
    # Only for S3-compatible servers other than AWS (MinIO, moto); empty = AWS default.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    triton_grpc_url: str = DEFAULT_TRITON_GRPC_URL
    triton_http_url: str = "http://127.0.0.1:8000"
    # TLS to Triton's gRPC endpoint: on = verify it with this CA file (empty: the system's
    # roots); a client certificate and key as well for mutual TLS. (security/tls.py)
    triton_grpc_tls: bool = False
    triton_grpc_ca_file: str = ""
    triton_grpc_cert_file: str = ""
    triton_grpc_key_file: str = ""
    model_repository: Path = Field(default_factory=lambda: data_dir("model_repository"))
    # The local CPU rendering of model_repository (LocalStack, `medtriage triton serve`) without
    # Triton's dynamic batcher: measured faster end to end on that backend (1-image CT studies
    # +9 %, 32-slice series +36 %, benchmarks/README.md). STAT studies go first in the job queue
    # either way. The production configs (docker-compose.gpu.yml) keep their batcher.
    triton_local_dynamic_batching: bool = False
    home: Path = Field(default_factory=default_home)
    # Queue names are prefixed so several stacks (tests, demo) can share one Redis.
    queue_prefix: str = "medtriage"
    # Database connection pool bounds per process.
    db_pool_min: int = 1
    db_pool_max: int = 8
    # A pooled connection unchecked for this long is checked before use (0 = every checkout).
    db_check_after_s: float = 1.0
    # RQ: a study job taking longer than this is killed and marked failed.
    job_timeout_s: int = 600
    # Studies arriving instance by instance (STOW-RS, C-STORE) are queued once none has
    # arrived for this long, unless the sender says the study is complete. Common: the
    # reconciler (workers) leaves a study alone while it waits for this.
    ingest_stable_age_s: float = 60.0
    # Reliability (orchestrator/queue/reconcile.py): an open study untouched this long is checked
    # against RQ every reconcile_interval_s, and requeued if nobody will run it...
    reconcile_interval_s: float = 15.0
    reconcile_stale_after_s: float = 30.0
    # ...until its job has had this many attempts; then it goes to the dead-letter list.
    max_attempts: int = 6
    # Backpressure: uploads get 503 + Retry-After while the queue is deeper or its head
    # older than these (0 = no limit).
    max_queue_depth: int = 10_000
    max_queue_age_s: float = 600.0
    # A worker told to stop (SIGTERM) finishes its job within this, else exits; the
    # reconciler reruns what it left.
    shutdown_grace_s: float = 60.0
    # Security (orchestrator/security/). Local store encryption at rest: "kid:base64(32 bytes)"
    # entries, comma-separated; the first encrypts new objects, all stay readable (rotation).
    # Empty = objects stored as given (only for throwaway local use).
    storage_encryption_keys: str = ""
    # The same entries read from a mounted secret (Docker/Kubernetes secret file) instead.
    storage_encryption_keys_file: Path | None = None
    # "local": one machine, the demo; a local store without keys gets a key file beside its
    # folder (<objects>.storage-key). Anything else ("production"): keys come from the
    # environment or a mounted secret (or S3 SSE-KMS), never a file made beside the data,
    # and a keys file inside the store's folder is refused at start.
    deployment: Literal["local", "production"] = "local"
    # S3 server-side encryption: "AES256" (SSE-S3) or "aws:kms" (SSE-KMS, with the key id below).
    s3_sse: str = "AES256"
    s3_kms_key_id: str = ""
    # SSRF guard (orchestrator/security/outbound.py): webhook and PACS target URLs must be
    # public addresses, except in these comma-separated CIDRs (e.g. the hospital's PACS net).
    outbound_allow_networks: str = ""
    # Ports public destinations may be called on, comma-separated (networks allowed above are
    # opened on every port). Plain http needs an admin's allow_http on the target as well.
    outbound_allow_ports: str = "443"
    # Audit anchors (security/anchors.py): the HMAC key (kept outside the database; empty =
    # no anchors) and how often the API anchors the chain's head in the object store.
    audit_anchor_key: str = ""
    audit_anchor_interval_s: float = 300.0

    @property
    def queue_name(self) -> str:
        return f"{self.queue_prefix}:studies"

    @model_validator(mode="after")
    def _storage_keys(self) -> CommonSettings:
        """Refuse, at start, storage keys kept with the data they protect (issue 16, item 12)."""
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'objects'}"
        store = urlparse(self.storage_url)
        folder = Path(store.path).resolve() if store.scheme == "file" else None
        if self.storage_encryption_keys_file is not None:
            path = self.storage_encryption_keys_file.resolve()
            if folder is not None and path.is_relative_to(folder):
                raise ValueError(
                    f"MEDTRIAGE_STORAGE_ENCRYPTION_KEYS_FILE {path} is inside the object store"
                    f" {folder}: whoever can read the objects could read their key; mount it"
                    " elsewhere (e.g. /run/secrets/)"
                )
            if self.storage_encryption_keys:
                raise ValueError("set MEDTRIAGE_STORAGE_ENCRYPTION_KEYS or ..._KEYS_FILE, not both")
            self.storage_encryption_keys = path.read_text().strip()
        if self.deployment != "local" and folder is not None and not self.storage_encryption_keys:
            raise ValueError(
                f"deployment {self.deployment!r} with a local object store needs its keys from"
                " MEDTRIAGE_STORAGE_ENCRYPTION_KEYS or MEDTRIAGE_STORAGE_ENCRYPTION_KEYS_FILE"
                f" (a mounted secret), not a key file made beside {folder}"
            )
        return self


class ApiSettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = 8080
    # Whole-request upload limit; larger bodies get 413 before anything is stored.
    max_upload_bytes: int = 512 * 1024 * 1024
    # Decompression-bomb guard: declared Rows x Columns x Frames x Samples above this is refused.
    max_pixels: int = 400_000_000
    # How long the API waits for a dependency in /readyz before calling it down.
    readiness_timeout_s: float = 2.0
    page_size_max: int = 200
    # People's bearer tokens (OIDC): issuer, audience and a static JWKS file; empty = keys only.
    oidc_issuer: str = ""
    oidc_audience: str = "medtriage"
    oidc_jwks_file: str = ""
    oidc_role_claim: str = "medtriage_role"
    oidc_tenant_claim: str = "medtriage_tenant"
    # Session lifetimes for people: idle (since the last request) and absolute (since login).
    session_idle_timeout_s: int = 15 * 60
    session_max_s: int = 8 * 3600
    # Longest break-glass grant a person may give themselves.
    break_glass_max_s: int = 3600
    # Per-key token bucket: sustained requests per second and burst; 0 turns limiting off.
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 200
    # Per source address, before authentication: failed authentications allowed in a burst,
    # then per second; beyond that 429 without a key lookup (security/refusals.py).
    auth_failure_burst: int = 30
    auth_failure_rate_per_s: float = 0.5
    # Refused keys are audited as one row per source per this interval, with a count.
    refused_audit_interval_s: float = 60.0
    # /docs, /redoc and /openapi.json; turn off in production.
    docs_enabled: bool = True
    # The reverse proxies in front of the API (comma-separated addresses / CIDRs): only
    # their X-Forwarded-For is believed for the audit's source_ip (api/origin.py).
    trusted_proxies: str = ""
    # TLS for the API: both files set = HTTPS only (TLS 1.2 or newer).
    tls_certfile: str = ""
    tls_keyfile: str = ""
    # Drift gauges: the newest N live results per model version, recomputed at most this often.
    drift_window: int = 1000
    drift_refresh_s: float = 30.0
    # Ingest: how long an Idempotency-Key's first answer is kept for retries.
    idempotency_ttl_s: int = 24 * 3600
    # DIMSE C-STORE receiver (`medtriage dimse`): its AE title and address, the tenant it
    # stores into, and the calling AE titles it accepts (comma-separated; empty = any).
    dimse_ae_title: str = "MEDTRIAGE"
    dimse_host: str = "127.0.0.1"
    dimse_port: int = 11112
    dimse_tenant: str = "default"
    dimse_calling_aets: str = ""
    # Whether a C-STORE association's release says its studies are complete (queued at once).
    dimse_release_completes: bool = True


class WorkerSettings(CommonSettings):
    # Worker processes started by `medtriage worker` / the local stack.
    concurrency: int = 1
    # Deadline for one Triton call (client_timeout).
    triton_timeout_s: float = 30.0
    max_pixels: int = 400_000_000
    # Decoding runs in a child process with this address-space limit and deadline, so a file
    # that crashes a codec, loops or exhausts memory costs one instance, not the worker.
    decode_isolation: bool = True
    # Pixel data in a native (uncompressed) transfer syntax is read by numpy, no codec runs:
    # it is decoded in the worker unless this is true (the round trip to the child cost
    # CT slices 10-25 % of throughput).
    decode_isolation_uncompressed: bool = False
    decode_memory_mb: int = 4096
    decode_timeout_s: float = 120.0
    preview_max_size: int = 512
    preview_quality: int = 85
    # Confidence gate: a top-class triage confidence below this sends the study to review.
    review_confidence_threshold: float = 0.75
    # Instances per Triton request (bounded by the model's max_batch_size).
    infer_batch_size: int = Field(default=32, ge=1)
    # Each worker process serves its metrics on the first free port of
    # [worker_metrics_port, worker_metrics_port + worker_metrics_port_span); 0 = off.
    worker_metrics_port: int = 9200
    worker_metrics_port_span: int = 100
    worker_metrics_address: str = "127.0.0.1"
    # Worker commits wait for the WAL flush only when true. Off saves ~0.35 ms per commit, but
    # a PostgreSQL crash (fault test: immediate stop mid-load) then left an orphaned preview
    # object once, so durable commits stay the default until that path is understood.
    worker_synchronous_commit: bool = True


class CliSettings(ApiSettings, WorkerSettings):
    """The CLI starts every process kind, so it sees every setting."""

    # Where the local stack looks for a machine's own PostgreSQL and Redis when no URL is
    # configured; nothing answering there = embedded servers (cli/services.py).
    local_postgres_address: str = "127.0.0.1:5432"
    local_redis_address: str = "127.0.0.1:6379"
