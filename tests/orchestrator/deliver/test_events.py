"""Server-Sent Events over the real stack: a client reads the study's stream (and the tenant
feed) with httpx while the study runs through the API process, the worker and Triton."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

STREAM_TIMEOUT_S = 120.0
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}


def _events(response: httpx.Response) -> Any:
    """(event, data) pairs from an SSE response, as they arrive."""
    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _upload(client: httpx.Client, images: int = 2) -> str:
    pixels, _ = load_samples()
    uid = generate_uid()
    files = [
        (
            "files",
            (
                f"i{i}.dcm",
                radiograph(pixels[i], study_uid=uid, instance_number=i),
                "application/dicom",
            ),
        )
        for i in range(images)
    ]
    response = client.post("/v1/studies", files=files)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def client(stack: Any, make_key: Any) -> httpx.Client:
    return httpx.Client(
        base_url=stack.api_url,
        headers={"Authorization": f"Bearer {make_key('uploader', 'tenant-events')}"},
        timeout=httpx.Timeout(STREAM_TIMEOUT_S, connect=10),
    )


def test_feed_and_study_stream_follow_a_running_study(client: httpx.Client) -> None:
    feed: list[tuple[str, dict[str, Any]]] = []
    feed_ready = threading.Event()

    def read_feed() -> None:
        with client.stream("GET", "/v1/events") as response:
            assert response.status_code == 200
            for event, data in _events(response):
                feed.append((event, data))
                feed_ready.set()
                if data.get("status") in TERMINAL:
                    return

    reader = threading.Thread(target=read_feed, daemon=True)
    reader.start()
    assert feed_ready.wait(30), "the feed sent no hello"
    study_id = _upload(client)
    seen: list[tuple[str, dict[str, Any]]] = []
    started = time.monotonic()
    with client.stream("GET", f"/v1/studies/{study_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, data in _events(response):
            seen.append((event, data))
        # The server ends the stream itself once the study is finished.
    assert time.monotonic() - started < STREAM_TIMEOUT_S
    assert seen[0][0] == "status"
    assert seen[-1][1]["status"] in TERMINAL
    assert all(d["study_id"] == study_id for _, d in seen)
    stages = [d["stage"] for e, d in seen if e == "stage"]
    if seen[0][1]["status"] in ("queued", "received"):
        # Connected before the worker took the job: every stage change arrives, in order.
        assert stages == ["processing", "preprocess", "triage", "analysis", "report"], stages
    else:
        assert stages == [] or stages[-1] == "report", stages
    final = client.get(f"/v1/studies/{study_id}").json()
    assert final["status"] == seen[-1][1]["status"]

    reader.join(30)
    feed_stages = [d["stage"] for e, d in feed if e == "stage" and d["study_id"] == study_id]
    assert feed[0][0] == "hello"
    assert feed_stages == ["processing", "preprocess", "triage", "analysis", "report"]


def test_finished_study_stream_ends_after_the_snapshot(client: httpx.Client) -> None:
    study_id = _upload(client, images=1)
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    while client.get(f"/v1/studies/{study_id}").json()["status"] not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with client.stream("GET", f"/v1/studies/{study_id}/events") as response:
        events = list(_events(response))
    assert len(events) == 1 and events[0][0] == "status"
    assert events[0][1]["status"] in TERMINAL


def test_other_tenants_study_is_not_found(client: httpx.Client, make_key: Any) -> None:
    study_id = _upload(client, images=1)
    other = make_key("uploader", "tenant-other-events")
    response = client.get(
        f"/v1/studies/{study_id}/events", headers={"Authorization": f"Bearer {other}"}
    )
    assert response.status_code == 404
    assert client.get("/v1/events", headers={"Authorization": "Bearer nope"}).status_code == 401
