"""No PHI where it does not belong: unique values planted in 20 identifying attributes go
through the real stack (API, worker, Triton, PostgreSQL, Redis, the object store), with a
file that fails preprocessing and malformed requests on the way, and then none of them may
appear in the log files, any /metrics output, any Redis key or value, or any object key."""

from __future__ import annotations

import contextlib
import io
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from redis import Redis

from orchestrator.cli.stack import log_dir
from orchestrator.samples import load_samples

pytestmark = pytest.mark.integration

TENANT = "tenant-phi"
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
# Redis values are searched as stored and, where they are zlib streams (RQ job payloads
# are compressed pickles), decompressed too.
_REDIS_SCAN_COUNT = 1000


def _undecodable(data: bytes) -> bytes:
    """The same planted header over JPEG 2000 pixel data that no decoder can read: ingest
    accepts it (compressed data is not checked there), preprocessing fails it."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _needles(planted: list[dict[str, str]]) -> set[str]:
    out = set()
    for values in planted:
        for value in values.values():
            out.add(value)
            if "^" in value:  # a person's name: each component on its own as well
                out.update(part for part in value.split("^") if len(part) > 3)
    return out


def _hits(needles: set[str], text: bytes, where: str) -> list[str]:
    return [f"{where}: {n}" for n in sorted(needles) if n.encode() in text]


def _redis_dump(redis: Redis) -> list[tuple[bytes, bytes]]:
    """(key, every value it holds, concatenated) for every key of the database."""
    out = []
    for key in redis.scan_iter(count=_REDIS_SCAN_COUNT):
        kind = redis.type(key).decode()
        if kind == "string":
            parts = [redis.get(key) or b""]
        elif kind == "hash":
            parts = [b for kv in redis.hgetall(key).items() for b in kv]
        elif kind == "list":
            parts = list(redis.lrange(key, 0, -1))
        elif kind == "set":
            parts = list(redis.smembers(key))
        elif kind == "zset":
            parts = list(redis.zrange(key, 0, -1))
        elif kind == "stream":
            parts = [b for _, fields in redis.xrange(key) for kv in fields.items() for b in kv]
        else:
            parts = []
        values = []
        for part in parts:
            values.append(part)
            with contextlib.suppress(zlib.error):
                values.append(zlib.decompress(part))
        out.append((key, b"\n".join(values)))
    return out


def test_planted_phi_is_found_nowhere(
    stack: Any,
    make_key: Any,
    phi_radiograph: Any,
    redis_url: str,
    storage_dir: Path,
    queue_prefix: str,
) -> None:
    images, _ = load_samples()
    key = make_key("uploader", tenant=TENANT)
    c = httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {key}"})
    study_uid, series_uid = generate_uid(), generate_uid()
    first = phi_radiograph(images[0], study_uid, series_uid)
    # One patient per study; every other planted value differs per instance.
    patient = {k: first[1][k] for k in ("PatientID", "PatientName", "PatientBirthDate")}
    good = [first, phi_radiograph(images[1], study_uid, series_uid, patient)]
    bad_data, bad_values = phi_radiograph(images[2], study_uid, series_uid, patient)
    planted = [v for _, v in good] + [bad_values]
    needles = _needles(planted)
    # 3 x 20 values, less those one study shares (UIDs of study and series, the patient).
    assert len(planted[0]) == 20 and len(needles) >= 50

    # The study: two good instances and one that fails preprocessing, plus a file that is
    # not DICOM at all (its text names the patient).
    files = [("files", (f"{i}.dcm", d, "application/dicom")) for i, (d, _) in enumerate(good)]
    files.append(("files", ("bad.dcm", _undecodable(bad_data), "application/dicom")))
    junk = f"Patient {planted[0]['PatientName']} born {planted[0]['PatientBirthDate']}"
    files.append(("files", ("notes.dcm", junk.encode(), "application/dicom")))
    r = c.post("/v1/studies", files=files)
    assert r.status_code == 202, r.text
    study_id = r.json()["id"]
    outcomes = sorted(f["outcome"] for f in r.json()["files"])
    assert outcomes == ["accepted", "accepted", "accepted", "rejected"], r.text

    # Malformed requests carrying identifying values: refused, and not echoed back.
    value = planted[0]["PatientID"]
    malformed = [
        c.post("/v1/studies", params={"priority": value}, files=files[:1]),
        c.get(f"/v1/studies/{value}"),
        c.get("/v1/studies", params={"status": value, "limit": value}),
        c.post("/v1/webhooks", json={"url": f"ftp://{value}.example/x", "events": [value]}),
        c.post("/v1/studies", content=junk.encode(), headers={"Content-Type": "application/zip"}),
    ]
    for answer in malformed:
        assert answer.status_code in (400, 422), (answer.request.url, answer.status_code)
        assert _hits(needles, answer.content, str(answer.request.url.path)) == []

    deadline = time.monotonic() + WAIT_S
    while (body := c.get(f"/v1/studies/{study_id}").json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, body
        time.sleep(0.3)
    states = sorted(i["status"] for i in body["instances"])
    assert states == ["done", "done", "failed"], body["instances"]

    found: list[str] = []
    # Logs: every process of the stack and Triton.
    logs = [p for p in log_dir(stack.home).rglob("*") if p.is_file()]
    logs.append(Path(stack.triton.log_file))
    assert any(p.name.startswith("worker") for p in logs) and any(p.name == "api.log" for p in logs)
    for path in logs:
        if path.exists():
            found += _hits(needles, path.read_bytes(), f"log {path.name}")
    # /metrics: the API's and every worker's.
    scraped = [f"{stack.api_url}/metrics"]
    for group in httpx.get(f"{stack.api_url}/metrics/targets", timeout=10).json():
        scraped += [f"http://{t}/metrics" for t in group["targets"]]
    assert len(scraped) >= 2, "no worker metrics endpoint was listed"
    for url in scraped:
        answer = httpx.get(url, timeout=10)
        assert answer.status_code == 200
        found += _hits(needles, answer.content, f"metrics {url}")
    # Redis: every key and value (this run's queue prefix, RQ's job hashes, everything).
    redis = Redis.from_url(redis_url)
    # The scanner's own check: a value planted on purpose (compressed, like RQ's) is found.
    canary = f"{queue_prefix}:phi-canary"
    redis.set(canary, zlib.compress(planted[0]["PatientName"].encode()), ex=60)
    dump = _redis_dump(redis)
    assert [k for k, v in dump if _hits(needles, v, "")] == [canary.encode()]
    redis.delete(canary)
    dump = [(k, v) for k, v in dump if k != canary.encode()]
    assert any(queue_prefix.encode() in k for k, _ in dump)
    assert any(k.startswith(b"rq:job:") for k, _ in dump)
    for k, v in dump:
        found += _hits(needles, k, "redis key") + _hits(needles, v, f"redis value of {k!r}")
    # Object keys (names only; the contents are sealed, see test_crypto.py).
    names = "\n".join(str(p.relative_to(storage_dir)) for p in storage_dir.rglob("*"))
    assert study_id in names
    found += _hits(needles, names.encode(), "object keys")

    print(
        f"\nPHI scan: {len(needles)} planted values; {len(logs)} log files, {len(scraped)}"
        f" metrics endpoints, {len(dump)} Redis keys searched; {len(found)} found"
    )
    assert found == []
