"""DICOMweb STOW-RS over the real stack: the real dicomweb-client library stores instances
(200 / 202 / 409 with the standard response), and hand-built bad requests are refused with a
clear 4xx and nothing stored."""

from __future__ import annotations

import io
import logging
import time
import uuid
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import fromstring

import httpx
import psycopg
import pytest
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.web import _load_xml_dataset
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from redis import Redis
from rq import Queue

from orchestrator.api import create_app
from orchestrator.ingest import stow as dicomweb
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import ApiSettings

pytestmark = pytest.mark.integration

SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0xC000, 0xA900


@pytest.fixture(scope="module")
def key(make_key: Any) -> str:
    return str(make_key("uploader", tenant="tenant-stow"))


def _client(stack: Any, key: str, **kwargs: Any) -> DICOMwebClient:
    return DICOMwebClient(
        url=f"{stack.api_url}/dicomweb", headers={"Authorization": f"Bearer {key}"}, **kwargs
    )


def _datasets(study_uid: str, n: int) -> list[Dataset]:
    images, _ = load_samples()
    series = generate_uid()
    return [
        dcmread(
            io.BytesIO(radiograph(images[i], study_uid=study_uid, series_uid=series, size=SIZE))
        )
        for i in range(n)
    ]


def _no_pixels(study_uid: str) -> Dataset:
    (ds,) = _datasets(study_uid, 1)
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _count(database_url: str, study_uid: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_id"
            " WHERE s.study_uid = %s",
            (study_uid,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _study_status(stack: Any, key: str, database_url: str, study_uid: str) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT id FROM studies WHERE study_uid = %s", (study_uid,)).fetchone()
    assert row is not None
    deadline = time.monotonic() + WAIT_S
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as c:
        while True:
            status = str(c.get(f"/v1/studies/{row[0]}").json()["status"])
            if status in TERMINAL or time.monotonic() > deadline:
                return status
            time.sleep(0.3)


def _objects(storage_dir: Path) -> set[Path]:
    # Originals only: the worker writes previews and reports of earlier studies meanwhile.
    return {p for p in storage_dir.rglob("originals/*") if p.is_file()}


def test_dicomweb_client_stores_a_study_and_it_is_processed(
    stack: Any, key: str, database_url: str
) -> None:
    study_uid = generate_uid()
    datasets = _datasets(study_uid, 3)
    # A small chunk size makes the client send a chunked body (no Content-Length).
    # ?complete=true: the sender says the study is whole, so it is queued without waiting.
    answer = _client(stack, key, chunk_size=4096).store_instances(
        datasets, additional_params={"complete": "true"}
    )
    referenced = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert referenced == {ds.SOPInstanceUID for ds in datasets}
    assert all(
        item.ReferencedSOPClassUID == datasets[0].SOPClassUID
        for item in answer.ReferencedSOPSequence
    )
    assert "FailedSOPSequence" not in answer
    assert _count(database_url, study_uid) == 3
    assert _study_status(stack, key, database_url, study_uid) in {"done", "needs_review"}
    # Sent again: referenced again with the WarningReason "Duplicate SOP Instance" (the
    # client takes the 202 as success), still stored once.
    again = _client(stack, key).store_instances(datasets[:1], study_instance_uid=study_uid)
    assert again.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == datasets[0].SOPInstanceUID
    assert again.ReferencedSOPSequence[0].WarningReason == 0x0111
    assert _count(database_url, study_uid) == 3


def test_instances_of_another_study_fail_with_202(stack: Any, key: str, database_url: str) -> None:
    study_uid, other_uid = generate_uid(), generate_uid()
    (mine,) = _datasets(study_uid, 1)
    (other,) = _datasets(other_uid, 1)
    answer = _client(stack, key).store_instances([mine, other], study_instance_uid=study_uid)
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        mine.SOPInstanceUID
    ]
    (failed,) = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert failed.FailureReason == DOES_NOT_MATCH
    assert _count(database_url, study_uid) == 1
    assert _count(database_url, other_uid) == 0


def test_nothing_stored_is_409_with_failure_reasons(
    stack: Any, key: str, database_url: str, storage_dir: Path
) -> None:
    study_uid = generate_uid()
    bad = _no_pixels(study_uid)
    objects = _objects(storage_dir)
    with pytest.raises(requests.HTTPError) as info:
        _client(stack, key).store_instances([bad])
    response = info.value.response
    assert response.status_code == 409
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    answer = Dataset.from_json(response.json())
    assert answer.FailedSOPSequence[0].ReferencedSOPInstanceUID == bad.SOPInstanceUID
    assert answer.FailedSOPSequence[0].FailureReason == DOES_NOT_MATCH
    assert "pixel" in response.headers["Warning"].lower()
    assert _objects(storage_dir) == objects
    assert _count(database_url, study_uid) == 0


def _multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    out = b""
    for ctype, data in parts:
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _raw(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_non_dicom_part_fails_alone_and_xml_is_offered(
    stack: Any, key: str, database_url: str
) -> None:
    study_uid = generate_uid()
    good, also_good = _datasets(study_uid, 2)
    boundary = uuid.uuid4().hex
    body = _multipart(
        [
            ("application/dicom", _raw(good)),
            ("application/dicom", b"this is not DICOM"),
            ("text/plain", b"notes"),
            ("application/dicom", _raw(also_good)),
        ],
        boundary,
    )
    r = httpx.post(
        f"{stack.api_url}/dicomweb/studies/{study_uid}",
        content=body,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+xml",
        },
        timeout=30,
    )
    assert r.status_code == 202, r.text
    assert r.headers["content-type"].startswith("application/dicom+xml")
    answer = _load_xml_dataset(fromstring(r.content))
    assert {i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence} == {
        good.SOPInstanceUID,
        also_good.SOPInstanceUID,
    }
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [
        CANNOT_UNDERSTAND,
        CANNOT_UNDERSTAND,
    ]
    warnings = r.headers.get_list("warning")
    assert len(warnings) == 2 and "not application/dicom" in warnings[1]
    assert _count(database_url, study_uid) == 2


@pytest.mark.parametrize(
    ("path", "content_type", "body", "status", "phrase"),
    [
        ("/dicomweb/studies", "application/dicom", b"x", 415, "multipart/related"),
        (
            "/dicomweb/studies",
            'multipart/related; type="application/dicom+json"; boundary=b',
            b"--b\r\n\r\n{}\r\n--b--",
            415,
            "not supported",
        ),
        ("/dicomweb/studies", 'multipart/related; type="application/dicom"', b"x", 400, "boundary"),
        (
            "/dicomweb/studies",
            'multipart/related; type="application/dicom"; boundary=abc',
            b"--abc\r\nContent-Type: application/dicom\r\n\r\nDICM-truncated",
            400,
            "closing boundary",
        ),
        (
            "/dicomweb/studies",
            'multipart/related; type="application/dicom"; boundary=abc',
            b"--abc--\r\n",
            400,
            "no parts",
        ),
        (
            "/dicomweb/studies/not-a-uid",
            'multipart/related; type="application/dicom"; boundary=abc',
            b"--abc--\r\n",
            400,
            "StudyInstanceUID",
        ),
    ],
    ids=["not-multipart", "metadata-type", "no-boundary", "truncated", "no-parts", "bad-uid"],
)
def test_bad_stow_requests_are_4xx_and_store_nothing(
    stack: Any,
    key: str,
    storage_dir: Path,
    path: str,
    content_type: str,
    body: bytes,
    status: int,
    phrase: str,
) -> None:
    objects = _objects(storage_dir)
    r = httpx.post(
        f"{stack.api_url}{path}",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=30,
    )
    assert r.status_code == status, r.text
    assert phrase in r.json()["detail"]
    assert _objects(storage_dir) == objects


def test_stow_needs_an_uploader(stack: Any, make_key: Any) -> None:
    reviewer = make_key("reviewer", tenant="tenant-stow")
    (ds,) = _datasets(generate_uid(), 1)
    with pytest.raises(requests.HTTPError) as info:
        _client(stack, reviewer).store_instances([ds])
    assert info.value.response.status_code == 403
    with pytest.raises(requests.HTTPError) as info:
        _client(stack, "mt_nope_nope").store_instances([ds])
    assert info.value.response.status_code == 401


def _in_process(settings_env: dict[str, str], **overrides: Any) -> TestClient:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    return TestClient(create_app(ApiSettings(**{**fields, **overrides})))


def _state(database_url: str, study_uid: str) -> tuple[str | None, int | None]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT s.status, a.instances FROM studies s"
            " LEFT JOIN study_arrivals a ON a.study_id = s.id WHERE s.study_uid = %s",
            (study_uid,),
        ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _stow(client: TestClient, key: str, ds: Dataset, query: str = "") -> int:
    boundary = uuid.uuid4().hex
    r = client.post(
        f"/dicomweb/studies{query}",
        content=_multipart([("application/dicom", _raw(ds))], boundary),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
    )
    return r.status_code


def test_a_study_arriving_in_pieces_is_queued_once_stable(
    stack: Any, settings_env: dict[str, str], key: str, database_url: str
) -> None:
    stable_s = 2.0
    study_uid = generate_uid()
    first, second = _datasets(study_uid, 2)
    with _in_process(settings_env, ingest_stable_age_s=stable_s) as client:
        assert _stow(client, key, first) == 200
        time.sleep(stable_s / 2)
        assert _state(database_url, study_uid) == ("received", 1)
        assert _stow(client, key, second) == 200
        last = time.monotonic()
        # The clock restarted with the second instance: still waiting after the first's age.
        time.sleep(stable_s * 0.6)
        assert _state(database_url, study_uid) == ("received", 2)
        deadline = last + stable_s + 10
        while _state(database_url, study_uid)[0] == "received" and time.monotonic() < deadline:
            time.sleep(0.1)
        waited = time.monotonic() - last
    status, waiting = _state(database_url, study_uid)
    assert status != "received" and waiting is None
    assert waited >= stable_s - 0.2
    assert _study_status(stack, key, database_url, study_uid) in {"done", "needs_review"}


def test_complete_queues_at_once(settings_env: dict[str, str], key: str, database_url: str) -> None:
    study_uid = generate_uid()
    (ds,) = _datasets(study_uid, 1)
    with _in_process(settings_env, ingest_stable_age_s=3600) as client:
        assert _stow(client, key, ds) == 200
        time.sleep(1.5)  # a few sweeps: nothing is due
        assert _state(database_url, study_uid) == ("received", 1)
        # "complete" on a retry of an instance already stored still completes the study
        # (202: stored before, a duplicate).
        assert _stow(client, key, ds, "?complete=true") == 202
        deadline = time.monotonic() + 10
        while _state(database_url, study_uid)[0] == "received" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _state(database_url, study_uid)[0] != "received"


def test_stow_past_the_queue_limit_is_503_and_stores_nothing(
    settings_env: dict[str, str], key: str, database_url: str
) -> None:
    prefix = f"stow-bp-{uuid.uuid4().hex[:8]}"
    study_uid = generate_uid()
    (ds,) = _datasets(study_uid, 1)
    with _in_process(
        settings_env, queue_prefix=prefix, max_queue_depth=1, max_queue_age_s=0
    ) as client:
        queue = Queue(
            f"{prefix}:studies", connection=Redis.from_url(settings_env["MEDTRIAGE_REDIS_URL"])
        )
        queue.enqueue("builtins.print", "waiting")  # no worker reads this queue
        try:
            boundary = uuid.uuid4().hex
            r = client.post(
                "/dicomweb/studies",
                content=_multipart([("application/dicom", _raw(ds))], boundary),
                headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                },
            )
        finally:
            queue.delete(delete_jobs=True)
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert _count(database_url, study_uid) == 0


@pytest.mark.parametrize("scan_bytes", [1, 2, 3, 7, 64, 1 << 20], ids=lambda n: f"scan-{n}")
def test_boundaries_are_found_across_reads(
    monkeypatch: pytest.MonkeyPatch, scan_bytes: int
) -> None:
    body = (
        b"preamble\r\n--abc\r\nContent-Type: application/dicom\r\nContent-Location: a\r\n\r\n"
        b"DATA1--ab\r\n--abc\r\n\r\nDATA2\r\n--abc--\r\nepilogue"
    )
    monkeypatch.setattr(dicomweb, "_SCAN_BYTES", scan_bytes)
    parts = dicomweb.split_related(io.BytesIO(body), "abc")
    assert [(h, body[s:e]) for h, s, e in parts] == [
        ({"content-type": "application/dicom", "content-location": "a"}, b"DATA1--ab"),
        ({}, b"DATA2"),
    ]


# Studies in one STOW-RS request: their ids, comma-joined, once overflowed the audit index (#24).
MANY_STUDIES = 120
TINY = 16


def test_one_request_of_many_studies_is_audited_per_study(
    database_url: str, redis_url: str, storage_dir: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    images, _ = load_samples()
    study_uids = [generate_uid() for _ in range(MANY_STUDIES)]
    parts = [
        ("application/dicom", radiograph(images[i % len(images)], study_uid=uid, size=TINY))
        for i, uid in enumerate(study_uids)
    ]
    prefix = f"stow-many-{uuid.uuid4().hex[:8]}"  # a queue no worker reads: no Triton needed
    settings = ApiSettings(
        database_url=database_url,
        redis_url=redis_url,
        queue_prefix=prefix,
        storage_url=f"file://{storage_dir}",
    )
    boundary = uuid.uuid4().hex
    try:
        with TestClient(create_app(settings)) as client:
            r = client.post(
                "/dicomweb/studies",
                content=_multipart(parts, boundary),
                headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                },
            )
    finally:
        Queue(f"{prefix}:studies", connection=Redis.from_url(redis_url)).delete(delete_jobs=True)
    assert r.status_code == 200, r.text
    with psycopg.connect(database_url) as conn:
        ids = dict(
            conn.execute(
                "SELECT study_uid, id::text FROM studies WHERE study_uid = ANY(%s)", (study_uids,)
            ).fetchall()
        )
        rows = conn.execute(
            "SELECT resource_id, outcome, request_id, detail FROM audit_log"
            " WHERE action = 'study.stow' AND resource_id = ANY(%s)",
            (list(ids.values()),),
        ).fetchall()
    assert len(ids) == MANY_STUDIES
    assert sorted(row[0] for row in rows) == sorted(ids.values())
    assert {row[1] for row in rows} == {"ok"}
    assert len({row[2] for row in rows}) == 1  # one request
    assert all(row[3]["studies"] == MANY_STUDIES for row in rows)
    assert all(row[3]["instances"] == {"accepted": 1} for row in rows)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
