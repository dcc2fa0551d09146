"""Webhooks: per-tenant endpoints told when a report is written or a review is closed.

``emit`` only inserts one ``webhook_deliveries`` row per matching endpoint, in the caller's
transaction, so the pipeline never waits on a client's server. A ``Dispatcher`` thread in
every worker process claims due deliveries (a lease: ``next_attempt_at`` moves past the
attempt's deadline, so a crashed dispatcher's claims come back by themselves) and posts
them from a small thread pool, so one hanging endpoint holds one slot for at most its
``timeout_s``. A failed attempt is retried after ``backoff_s * 2^(attempts-1)`` (capped);
after ``max_attempts`` the delivery is ``dead`` (the dead-letter list) until redelivered.

Every request is signed: ``X-Medtriage-Signature: t=<unix seconds>,v1=<hex>`` where v1 is
HMAC-SHA256 with the endpoint's secret over ``"<t>." + body``; receivers check it with
``verify`` (or any HMAC library) and reject stale timestamps. Where the deployment has
encryption keys (those of the object store), the secret is stored sealed (AES-GCM, bound to
its endpoint) and opened only by the dispatcher, to sign.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx
from psycopg import Connection
from psycopg_pool import ConnectionPool

from orchestrator import metrics
from orchestrator.errors import BadRequest, NotFound, StorageError
from orchestrator.security.outbound import DestinationRefused, OutboundPolicy
from orchestrator.store.db import connect_pool
from orchestrator.store.db import webhooks as db
from orchestrator.store.encryption import KeyRing, open_text, seal_text

log = logging.getLogger(__name__)

REPORT_CREATED = "report.created"
REVIEW_CLOSED = "review.closed"
EVENTS = (REPORT_CREATED, REVIEW_CLOSED)
SIGNATURE_HEADER = "X-Medtriage-Signature"
EVENT_HEADER = "X-Medtriage-Event"
DELIVERY_HEADER = "X-Medtriage-Delivery"
# Receivers should refuse signatures older than this (replay window).
SIGNATURE_TOLERANCE_S = 300
# Dispatcher: how often it looks for due deliveries when idle, how many it posts at once.
POLL_INTERVAL_S = 0.5
CONCURRENT_DELIVERIES = 4
# The dispatcher's own database connections (claims and outcomes are short statements).
DISPATCHER_POOL_MAX = 2
# A claim outlives the attempt's own deadline by this much before another dispatcher retries.
LEASE_MARGIN_S = 10.0
# Longest wait between two attempts, whatever the endpoint's backoff.
MAX_BACKOFF_S = 3600.0
# Bytes of an error response kept for the dead-letter list.
ERROR_SNIPPET_CHARS = 200
MAX_PAGE = 200


class WebhookNotFound(NotFound):
    pass


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is recent enough."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def body_of(delivery_id: UUID, event: str, payload: dict[str, Any]) -> bytes:
    """The exact bytes posted (and signed); the same on every attempt."""
    return json.dumps(
        {"id": str(delivery_id), "event": event, "data": payload}, sort_keys=True
    ).encode()


# --- endpoints -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    max_attempts: int = 6
    backoff_s: float = 10.0
    timeout_s: float = 5.0


def create(
    conn: Connection,
    tenant_id: UUID,
    url: str,
    events: list[str],
    policy: Policy,
    *,
    ring: KeyRing | None = None,
    allow_http: bool = False,
) -> tuple[dict[str, Any], str]:
    """Register an endpoint; returns its row and the signing secret (shown only now). With
    ``ring`` (the deployment's encryption keys) the secret is stored sealed, bound to the
    endpoint's id."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"webhook url must be an absolute http(s) URL, not {url!r}")
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise BadRequest(f"unknown events {unknown}; known: {list(EVENTS)}")
    secret = secrets.token_urlsafe(32)
    webhook_id = uuid.uuid4()
    stored = seal_text(ring, secret_context(webhook_id), secret) if ring is not None else secret
    row = db.insert_endpoint(
        conn,
        webhook_id=webhook_id,
        tenant_id=tenant_id,
        url=url,
        secret=stored,
        events=sorted(set(events)),
        max_attempts=policy.max_attempts,
        backoff_s=policy.backoff_s,
        timeout_s=policy.timeout_s,
        allow_http=allow_http,
    )
    return row, secret


def secret_context(webhook_id: Any) -> str:
    """What a sealed signing secret is bound to: its endpoint (a sealed value copied to
    another endpoint's row does not open)."""
    return f"webhook:{webhook_id}:secret"


def list_endpoints(conn: Connection, tenant_id: UUID) -> list[dict[str, Any]]:
    return db.active_endpoints(conn, tenant_id)


def deactivate(conn: Connection, tenant_id: UUID, webhook_id: UUID) -> None:
    if not db.deactivate(conn, tenant_id, webhook_id):
        raise WebhookNotFound(f"webhook {webhook_id} not found")


def _endpoint(conn: Connection, tenant_id: UUID, webhook_id: UUID) -> None:
    if not db.endpoint_exists(conn, tenant_id, webhook_id):
        raise WebhookNotFound(f"webhook {webhook_id} not found")


# --- deliveries ------------------------------------------------------------------------


def emit(conn: Connection, tenant_id: UUID, event: str, payload: dict[str, Any]) -> int:
    """Queue ``event`` for every active endpoint of the tenant that wants it; returns how many."""
    assert event in EVENTS, event
    return db.insert_deliveries(conn, tenant_id, event, payload)


def deliveries(
    conn: Connection,
    tenant_id: UUID,
    webhook_id: UUID,
    *,
    status: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    _endpoint(conn, tenant_id, webhook_id)
    return db.deliveries(conn, tenant_id, webhook_id, status=status, limit=min(limit, MAX_PAGE))


def redeliver(
    conn: Connection, tenant_id: UUID, webhook_id: UUID, delivery_id: UUID
) -> dict[str, Any]:
    """Send a delivery again from scratch (attempts reset), e.g. from the dead-letter list."""
    row = db.reset_delivery(conn, tenant_id, webhook_id, delivery_id)
    if row is None:
        if db.delivery_status(conn, tenant_id, webhook_id, delivery_id) is None:
            raise WebhookNotFound(f"delivery {delivery_id} not found")
        raise BadRequest(f"delivery {delivery_id} is still pending; it is retried already")
    return row


# --- dispatching -----------------------------------------------------------------------


def claim_due(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """Lease up to ``limit`` due deliveries (with their endpoint's url, secret and policy)."""
    return db.lease_due(conn, limit, margin_s=LEASE_MARGIN_S)


def attempt(
    client: httpx.Client, delivery: dict[str, Any], outbound: OutboundPolicy | None = None
) -> tuple[bool, int | None, str | None]:
    """POST one delivery; (delivered, HTTP status, error). Any 2xx is delivered. The URL is
    checked again first (its name may resolve elsewhere since it was registered), and the
    request goes to the address that was checked."""
    try:
        dest = (outbound or OutboundPolicy()).check(
            delivery["url"], what="webhook url", allow_http=bool(delivery.get("allow_http"))
        )
    except DestinationRefused as exc:
        return False, None, f"refused: {exc.message}"[:ERROR_SNIPPET_CHARS]
    body = body_of(delivery["id"], delivery["event"], delivery["payload"])
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(delivery["secret"], int(time.time()), body),
        EVENT_HEADER: delivery["event"],
        DELIVERY_HEADER: str(delivery["id"]),
    }
    try:
        r = client.post(
            dest.url,
            content=body,
            headers=dest.headers(headers),
            extensions=dest.extensions,
            timeout=httpx.Timeout(float(delivery["timeout_s"])),
        )
    except httpx.TimeoutException as exc:
        return False, None, f"timeout: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        return False, None, f"{type(exc).__name__}: {exc}"[:ERROR_SNIPPET_CHARS]
    if r.is_success:
        return True, r.status_code, None
    return False, r.status_code, f"HTTP {r.status_code}: {r.text[:ERROR_SNIPPET_CHARS]}"


def backoff_s(base_s: float, attempts: int) -> float:
    """Wait after the ``attempts``-th failed attempt: base, 2·base, 4·base, … capped."""
    return float(min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempts - 1)))


def record(
    conn: Connection,
    delivery: dict[str, Any],
    delivered: bool,
    status: int | None,
    error: str | None,
) -> str:
    """Store an attempt's outcome; returns the delivery's new status."""
    attempts = int(delivery["attempts"]) + 1
    if delivered:
        outcome = "delivered"
    elif attempts >= int(delivery["max_attempts"]) or not delivery["active"]:
        outcome = "dead"
    else:
        outcome = "pending"
    db.record_attempt(
        conn,
        delivery["id"],
        attempts=attempts,
        outcome=outcome,
        status=status,
        error=error,
        retry_in_s=backoff_s(float(delivery["backoff_s"]), attempts),
        delivered=delivered,
    )
    metrics.WEBHOOK_DELIVERIES.labels("retry" if outcome == "pending" else outcome).inc()
    return outcome


class Dispatcher(threading.Thread):
    """Posts due deliveries from a worker process, off the pipeline's thread, with its own
    small connection pool so a burst of deliveries never waits on (or starves) the pipeline."""

    def __init__(
        self,
        database_url: str,
        *,
        concurrency: int = CONCURRENT_DELIVERIES,
        outbound: OutboundPolicy | None = None,
        ring: KeyRing | None = None,
    ):
        super().__init__(name="medtriage-webhooks", daemon=True)
        self.outbound = outbound or OutboundPolicy()
        # Opens signing secrets stored sealed (webhooks.create with the deployment's keys).
        self.ring = ring
        self.pool: ConnectionPool = connect_pool(
            database_url, min_size=1, max_size=DISPATCHER_POOL_MAX
        )
        self.concurrency = concurrency
        self.stopping = threading.Event()
        self.client = httpx.Client(follow_redirects=False)
        self.executor = ThreadPoolExecutor(concurrency, thread_name_prefix="webhook")
        self.inflight: set[Future[None]] = set()

    def _deliver(self, delivery: dict[str, Any]) -> None:
        status: int | None
        error: str | None
        if not delivery["active"]:  # deleted since the event: nothing is sent; it goes dead
            delivered, status, error = False, None, "endpoint deleted"
        else:
            try:
                secret = open_text(
                    self.ring, secret_context(delivery["webhook_id"]), delivery["secret"]
                )
            except StorageError as exc:  # keys missing or rotated away: retried, then dead
                delivered, status, error = False, None, f"signing secret unreadable: {exc}"
            else:
                delivered, status, error = attempt(
                    self.client, {**delivery, "secret": secret}, self.outbound
                )
        try:
            with self.pool.connection() as conn:
                outcome = record(conn, delivery, delivered, status, error)
        except Exception:  # noqa: BLE001 - the lease expires and the delivery is retried
            log.exception("could not record webhook delivery %s", delivery["id"])
            return
        if outcome != "delivered":
            log.info("webhook delivery %s: %s (%s)", delivery["id"], outcome, error)

    def poll(self) -> int:
        self.inflight = {f for f in self.inflight if not f.done()}
        free = self.concurrency - len(self.inflight)
        if free <= 0:
            return 0
        with self.pool.connection() as conn:
            due = claim_due(conn, free)
        for d in due:
            self.inflight.add(self.executor.submit(self._deliver, d))
        return len(due)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                claimed = self.poll()
            except Exception:  # noqa: BLE001 - the thread must outlive a database blip
                log.warning("webhook dispatch pass failed", exc_info=True)
                claimed = 0
            if not claimed:
                self.stopping.wait(POLL_INTERVAL_S)

    def stop(self) -> None:
        self.stopping.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.pool.close()
