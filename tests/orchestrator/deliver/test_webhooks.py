"""Webhooks over the real stack and a real HTTP receiver in this process: HMAC signatures,
retries with exponential backoff, the dead-letter list and redelivery, timeouts, and an
endpoint that hangs while the pipeline keeps going."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest

from orchestrator.samples import load_samples

pytestmark = pytest.mark.integration

TENANT = "tenant-hooks"
BACKOFF_S = 0.3
WAIT_S = 60.0
# How long the hanging endpoint holds a request unless the test lets it go.
HANG_S = 45.0
SLOW_S = 2.0


class Receiver:
    """Records every request; /flaky fails twice, /down fails while down, /hang waits for
    ``release``, /slow answers after SLOW_S."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.down = True
        self.flaky_failures = 2
        self.open_hangs = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = receiver.answer(self.path, dict(self.headers), body)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        entry = {"path": path, "headers": headers, "body": body, "at": time.monotonic()}
        with self.lock:
            self.requests.append(entry)
            if path == "/flaky" and self.flaky_failures > 0:
                self.flaky_failures -= 1
                entry["code"] = 500
                return 500
            if path == "/down" and self.down:
                entry["code"] = 503
                return 503
            if path == "/hang":
                self.open_hangs += 1
        if path == "/hang":
            self.release.wait(HANG_S)
            with self.lock:
                self.open_hangs -= 1
        if path == "/slow":
            time.sleep(SLOW_S)
        entry["code"] = 200
        return 200

    def to(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()
    r.server.shutdown()


def _wait(what: str, check: Any, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _signed_by(secret: str, header: str, body: bytes) -> bool:
    """An independent check of the documented scheme: t=<unix>,v1=HMAC-SHA256("<t>." + body)."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    mac = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), fields["v1"]) and (
        abs(time.time() - int(fields["t"])) < 120
    )


def test_webhooks_end_to_end(
    stack: Any, make_key: Any, review_study: Any, receiver: Receiver, database_url: str
) -> None:
    key = make_key("uploader", tenant=TENANT)
    c = httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {key}"})

    # The receiver is plain http on loopback: an admin allows that per endpoint (issue 16).
    admin = {"Authorization": f"Bearer {make_key('admin', tenant=TENANT)}"}

    def register(path: str, **policy: Any) -> dict[str, Any]:
        body = {"url": receiver.url + path, "allow_http": True, **policy}
        r = c.post("/v1/webhooks", json=body, headers=admin)
        assert r.status_code == 201, r.text
        return dict(r.json())

    # Bad input is refused and registers nothing.
    assert c.post("/v1/webhooks", json={"url": "ftp://example.org/x"}).status_code == 422
    bad_event = c.post("/v1/webhooks", json={"url": receiver.url, "events": ["study.deleted"]})
    assert bad_event.status_code == 422
    too_long = c.post("/v1/webhooks", json={"url": receiver.url, "timeout_s": 300})
    assert too_long.status_code == 422
    reviewer = {"Authorization": f"Bearer {make_key('reviewer', tenant=TENANT)}"}
    assert c.post("/v1/webhooks", json={"url": receiver.url}, headers=reviewer).status_code == 403
    assert c.get("/v1/webhooks").json()["items"] == []

    flaky = register("/flaky", max_attempts=5, backoff_s=BACKOFF_S, events=["report.created"])
    down = register("/down", max_attempts=3, backoff_s=BACKOFF_S)
    hang = register("/hang", max_attempts=2, backoff_s=BACKOFF_S, timeout_s=30)
    slow = register("/slow", max_attempts=1, timeout_s=0.5)
    assert len(c.get("/v1/webhooks").json()["items"]) == 4
    assert "secret" not in c.get("/v1/webhooks").json()["items"][0]
    # At rest the secret is sealed with the deployment's keys (the stack's local store has
    # them); the deliveries below are signed with the plain one all the same.
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT secret FROM webhooks WHERE id = %s", (flaky["id"],)).fetchone()
    assert row is not None and row[0].startswith("sealed:v1:")
    assert flaky["secret"] not in row[0]

    def deliveries(hook: dict[str, Any], **params: Any) -> list[dict[str, Any]]:
        r = c.get(f"/v1/webhooks/{hook['id']}/deliveries", params=params)
        assert r.status_code == 200, r.text
        return list(r.json()["items"])

    images, _ = load_samples()
    first = review_study(c, key, images[5])

    # Flaky: two 500s, then delivered on the third attempt, with growing waits between.
    (done,) = _wait(
        "flaky delivered",
        lambda: [d for d in deliveries(flaky) if d["status"] == "delivered"],
    )
    assert done["attempts"] == 3 and done["last_status"] == 200
    assert done["payload"]["study_id"] == first and done["event"] == "report.created"
    sent = receiver.to("/flaky")
    assert [r["code"] for r in sent] == [500, 500, 200]
    assert len({r["body"] for r in sent}) == 1  # the same bytes each time
    for r in sent:
        assert _signed_by(flaky["secret"], r["headers"]["X-Medtriage-Signature"], r["body"])
        assert r["headers"]["X-Medtriage-Event"] == "report.created"
        assert r["headers"]["X-Medtriage-Delivery"] == done["id"]
        assert not _signed_by(down["secret"], r["headers"]["X-Medtriage-Signature"], r["body"])
    body = json.loads(sent[0]["body"])
    assert body == {"id": done["id"], "event": "report.created", "data": done["payload"]}
    gaps = [b["at"] - a["at"] for a, b in zip(sent, sent[1:], strict=False)]
    assert gaps[0] >= BACKOFF_S * 0.9 and gaps[1] >= 2 * BACKOFF_S * 0.9, gaps

    # Down: dead after max_attempts, on the dead-letter list; redelivered once it is up.
    (dead,) = _wait("down dead", lambda: deliveries(down, status="dead"))
    assert dead["attempts"] == 3 and dead["last_status"] == 503
    assert "HTTP 503" in dead["last_error"]
    assert len(receiver.to("/down")) == 3
    receiver.down = False
    r = c.post(f"/v1/webhooks/{down['id']}/deliveries/{dead['id']}/redeliver")
    assert r.status_code == 200 and r.json()["status"] == "pending", r.text
    _wait("down redelivered", lambda: deliveries(down, status="delivered"))
    assert len(receiver.to("/down")) == 4

    # Slow: longer than its 0.5 s deadline -> a timeout, dead after its single attempt.
    (timed_out,) = _wait("slow dead", lambda: deliveries(slow, status="dead"))
    assert timed_out["last_error"].startswith("timeout"), timed_out

    # Hang: the endpoint holds the request; the pipeline and the other endpoints go on.
    assert receiver.open_hangs >= 1
    started = time.monotonic()
    second = review_study(c, key, images[6])
    took = time.monotonic() - started
    assert receiver.open_hangs >= 1, "the hanging request is still open"
    assert took < HANG_S / 2, f"the second study took {took:.1f}s"
    _wait(
        "flaky got the second study",
        lambda: [
            d for d in deliveries(flaky, status="delivered") if d["payload"]["study_id"] == second
        ],
    )
    assert [d["status"] for d in deliveries(hang)] == ["pending", "pending"]
    # Redelivering a delivery still in flight is refused.
    pending = deliveries(hang)[0]
    r = c.post(f"/v1/webhooks/{hang['id']}/deliveries/{pending['id']}/redeliver")
    assert r.status_code == 400
    receiver.release.set()
    _wait("hang delivered", lambda: len(deliveries(hang, status="delivered")) == 2)

    # A closed review is announced too (to the endpoints that take every event).
    case = c.get("/v1/review/queue", headers=reviewer).json()["items"]
    (case_id,) = [x["id"] for x in case if x["study_id"] == second]
    assert c.post(f"/v1/review/cases/{case_id}/claim", headers=reviewer).is_success
    r = c.post(f"/v1/review/cases/{case_id}/verdict", json={"verdict": "agree"}, headers=reviewer)
    assert r.status_code == 200, r.text
    closed = _wait(
        "review.closed delivered",
        lambda: [d for d in deliveries(down, status="delivered") if d["event"] == "review.closed"],
    )
    assert closed[0]["payload"]["case_id"] == case_id
    assert closed[0]["payload"]["verdict"] == "agree"
    assert closed[0]["payload"]["report_revision"] == 2
    assert not [d for d in deliveries(flaky) if d["event"] == "review.closed"]

    # Another tenant sees none of it.
    other = {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-hooks-b')}"}
    assert c.get("/v1/webhooks", headers=other).json()["items"] == []
    assert c.get(f"/v1/webhooks/{flaky['id']}/deliveries", headers=other).status_code == 404
    # Deleted endpoints get nothing more.
    assert c.delete(f"/v1/webhooks/{flaky['id']}").status_code == 204
    assert c.delete(f"/v1/webhooks/{flaky['id']}").status_code == 404
    assert len(c.get("/v1/webhooks").json()["items"]) == 3
    # A delivery of a deleted endpoint is never sent again, even when asked to.
    sent_slow = len(receiver.to("/slow"))
    assert c.delete(f"/v1/webhooks/{slow['id']}").status_code == 204
    r = c.post(f"/v1/webhooks/{slow['id']}/deliveries/{timed_out['id']}/redeliver")
    assert r.status_code == 200, r.text
    _wait(
        "deleted endpoint's delivery dead",
        lambda: [
            d
            for d in deliveries(slow, status="dead")
            if d["last_error"] == "endpoint deleted" and d["id"] == timed_out["id"]
        ],
    )
    assert len(receiver.to("/slow")) == sent_slow
