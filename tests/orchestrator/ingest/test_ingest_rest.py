"""REST ingest in-process over real PostgreSQL, Redis and object store: a zip of a study, a
raw application/dicom body, per-file outcomes, duplicates stored once, Idempotency-Key
replay per tenant, and bad bodies refused with nothing stored."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from orchestrator.api import create_app
from orchestrator.samples import load_samples, radiograph
from orchestrator.security.oidc import Issuer
from orchestrator.settings import ApiSettings
from orchestrator.store.db.keys import ensure_tenant

pytestmark = pytest.mark.integration

SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)


@pytest.fixture(scope="module")
def api(settings_env: dict[str, str]) -> Iterator[TestClient]:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    with TestClient(create_app(ApiSettings(**fields))) as client:
        yield client


@pytest.fixture(scope="module")
def auth(make_key: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-ingest')}"}


def _instances(study_uid: str, n: int) -> list[bytes]:
    images, _ = load_samples()
    series = generate_uid()
    return [
        radiograph(images[i], study_uid=study_uid, series_uid=series, size=SIZE, instance_number=i)
        for i in range(n)
    ]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _instance_count(database_url: str, study_uid: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_id"
            " WHERE s.study_uid = %s",
            (study_uid,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _objects(storage_dir: Path) -> set[Path]:
    # Originals only: a worker may write previews and reports of earlier studies meanwhile.
    return {p for p in storage_dir.rglob("originals/*") if p.is_file()}


def test_zip_of_a_study_reports_each_member(
    api: TestClient, auth: dict[str, str], database_url: str
) -> None:
    study_uid = generate_uid()
    good = _instances(study_uid, 3)
    body = _zip(
        {
            "STUDY/SER1/IM1": good[0],
            "STUDY/SER1/IM2": good[1],
            "STUDY/SER2/IM3.dcm": good[2],
            "STUDY/notes.txt": b"not a dicom file at all",
            "__MACOSX/STUDY/._IM1": b"resource fork",
            "DICOMDIR": b"index",
        }
    )
    r = api.post("/v1/studies", content=body, headers={**auth, "Content-Type": "application/zip"})
    assert r.status_code == 202, r.text
    files = {f["filename"]: f for f in r.json()["files"]}
    assert {name.split("/", 1)[1] for name in files} == {
        "STUDY/SER1/IM1",
        "STUDY/SER1/IM2",
        "STUDY/SER2/IM3.dcm",
        "STUDY/notes.txt",
    }
    outcomes = sorted(f["outcome"] for f in files.values())
    assert outcomes == ["accepted", "accepted", "accepted", "rejected"]
    bad = next(f for f in files.values() if f["outcome"] == "rejected")
    assert "DICOM" in bad["reason"] and bad["category"]
    assert _instance_count(database_url, study_uid) == 3


def test_zip_inside_multipart_is_unpacked(
    api: TestClient, auth: dict[str, str], database_url: str
) -> None:
    study_uid = generate_uid()
    a, b, c = _instances(study_uid, 3)
    r = api.post(
        "/v1/studies",
        files=[
            ("files", ("part.zip", _zip({"a.dcm": a, "b.dcm": b}), "application/zip")),
            ("files", ("c.dcm", c, "application/dicom")),
        ],
        headers=auth,
    )
    assert r.status_code == 202, r.text
    assert [f["outcome"] for f in r.json()["files"]] == ["accepted"] * 3
    assert _instance_count(database_url, study_uid) == 3


def test_raw_dicom_body_and_same_sop_instance_twice_stored_once(
    api: TestClient, auth: dict[str, str], database_url: str, storage_dir: Path
) -> None:
    study_uid = generate_uid()
    (data,) = _instances(study_uid, 1)
    headers = {**auth, "Content-Type": "application/dicom"}
    first = api.post("/v1/studies", content=data, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["files"][0]["outcome"] == "accepted"
    objects = _objects(storage_dir)
    again = api.post("/v1/studies", content=data, headers=headers)
    assert again.status_code == 202, again.text
    assert again.json()["files"][0]["outcome"] == "duplicate"
    assert again.json()["id"] == first.json()["id"]
    # The same instance twice in one request: the second is a duplicate too.
    both = api.post(
        "/v1/studies",
        files=[("files", ("x.dcm", data, "application/dicom"))] * 2,
        headers=auth,
    )
    assert [f["outcome"] for f in both.json()["files"]] == ["duplicate", "duplicate"]
    assert _instance_count(database_url, study_uid) == 1
    assert _objects(storage_dir) == objects
    with psycopg.connect(database_url) as conn:
        jobs = conn.execute(
            "SELECT count(*) FROM jobs WHERE study_id = %s", (first.json()["id"],)
        ).fetchone()
    assert jobs is not None and jobs[0] == 1


@pytest.mark.parametrize(
    ("content_type", "body", "status", "phrase"),
    [
        ("text/plain", b"hello", 415, "not accepted"),
        ("application/json", b"{}", 415, "not accepted"),
        ("application/zip", b"PK\x03\x04 truncated", 400, "zip"),
        ("application/zip", b"plain bytes", 400, "not a zip"),
        ("application/dicom", b"", 400, "empty"),
        ("application/dicom", b"\x00" * 300, 422, "DICOM"),
    ],
    ids=["text", "json", "corrupt-zip", "not-zip", "empty-dicom", "not-dicom"],
)
def test_bad_bodies_are_4xx_with_a_reason_and_store_nothing(
    api: TestClient,
    auth: dict[str, str],
    storage_dir: Path,
    content_type: str,
    body: bytes,
    status: int,
    phrase: str,
) -> None:
    objects = _objects(storage_dir)
    r = api.post("/v1/studies", content=body, headers={**auth, "Content-Type": content_type})
    assert r.status_code == status, r.text
    assert phrase in r.json()["detail"]
    assert _objects(storage_dir) == objects


def test_zip_bomb_is_refused_before_inflating(
    api: TestClient, auth: dict[str, str], settings_env: dict[str, str], storage_dir: Path
) -> None:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    limit = 1 << 20
    bomb = _zip({"zeros.dcm": b"\x00" * (4 * limit)})  # compresses to a few kB
    assert len(bomb) < limit // 10
    objects = _objects(storage_dir)
    with TestClient(create_app(ApiSettings(**fields, max_upload_bytes=limit))) as small:
        r = small.post(
            "/v1/studies", content=bomb, headers={**auth, "Content-Type": "application/zip"}
        )
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]
    assert _objects(storage_dir) == objects


def test_idempotency_key_replays_the_first_answer(
    api: TestClient, auth: dict[str, str], database_url: str, make_key: Any
) -> None:
    study_uid = generate_uid()
    a, b = _instances(study_uid, 2)
    key = f"retry-{generate_uid()}"
    headers = {**auth, "Idempotency-Key": key}
    first = api.post(
        "/v1/studies", files=[("files", ("a.dcm", a, "application/dicom"))], headers=headers
    )
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    retry = api.post(
        "/v1/studies", files=[("files", ("a.dcm", a, "application/dicom"))], headers=headers
    )
    assert retry.status_code == 202
    assert retry.headers["Idempotent-Replayed"] == "true"
    # The first answer, not a fresh one (which would say 'duplicate').
    assert retry.json() == first.json()
    assert retry.json()["files"][0]["outcome"] == "accepted"
    # Same key, different content: refused, nothing stored.
    other = api.post(
        "/v1/studies", files=[("files", ("b.dcm", b, "application/dicom"))], headers=headers
    )
    assert other.status_code == 422
    assert "different request" in other.json()["detail"]
    assert _instance_count(database_url, study_uid) == 1
    # Keys are per tenant: another tenant's identical key is independent.
    other_tenant = {"Authorization": f"Bearer {make_key('uploader', tenant='tenant-ingest-2')}"}
    fresh = api.post(
        "/v1/studies",
        files=[("files", ("b.dcm", b, "application/dicom"))],
        headers={**other_tenant, "Idempotency-Key": key},
    )
    assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM idempotency_keys WHERE key = %s", (key,)
        ).fetchone()
    assert rows is not None and rows[0] == 2


def test_idempotency_key_of_a_refused_upload_replays_the_refusal(
    api: TestClient, auth: dict[str, str]
) -> None:
    headers = {
        **auth,
        "Idempotency-Key": f"bad-{generate_uid()}",
        "Content-Type": "application/dicom",
    }
    first = api.post("/v1/studies", content=b"\x00" * 300, headers=headers)
    assert first.status_code == 422
    retry = api.post("/v1/studies", content=b"\x00" * 300, headers=headers)
    assert retry.status_code == 422
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == first.json()


def test_idempotency_key_in_flight_is_409_and_bad_key_400(
    api: TestClient, auth: dict[str, str], database_url: str, make_key: Any
) -> None:
    (data,) = _instances(generate_uid(), 1)
    key = f"inflight-{generate_uid()}"
    with psycopg.connect(database_url) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE name = 'tenant-ingest'").fetchone()
        assert tenant is not None
        from orchestrator.api.routes.uploads import digest

        conn.execute(
            "INSERT INTO idempotency_keys (tenant_id, key, route, request_sha256)"
            " VALUES (%s, %s, 'POST /v1/studies', %s)",
            (tenant[0], key, digest([("body.dcm", data)], None, "0")),
        )
    headers = {**auth, "Idempotency-Key": key, "Content-Type": "application/dicom"}
    r = api.post("/v1/studies", content=data, headers=headers)
    assert r.status_code == 409, r.text
    assert "still being processed" in r.json()["detail"]
    r = api.post("/v1/studies", content=data, headers={**headers, "Idempotency-Key": "x" * 300})
    assert r.status_code == 400
    assert "Idempotency-Key" in r.json()["detail"]


def test_truncated_original_is_refused_at_upload(
    api: TestClient, auth: dict[str, str], storage_dir: Path
) -> None:
    (data,) = _instances(generate_uid(), 1)
    objects = _objects(storage_dir)
    r = api.post(
        "/v1/studies", content=data[:-100], headers={**auth, "Content-Type": "application/dicom"}
    )
    assert r.status_code == 422, r.text
    assert "truncated" in r.json()["detail"]
    assert _objects(storage_dir) == objects


def test_bodies_over_the_limit_are_413_with_or_without_content_length(
    auth: dict[str, str], settings_env: dict[str, str], storage_dir: Path
) -> None:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    limit = 4096
    (data,) = _instances(generate_uid(), 1)
    assert len(data) > limit
    objects = _objects(storage_dir)
    boundary = "b0undary"
    related = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with TestClient(create_app(ApiSettings(**fields, max_upload_bytes=limit))) as small:
        for path, ctype, body in (
            ("/v1/studies", "application/dicom", data),
            ("/v1/studies", "application/zip", _zip({"a.dcm": data})),
            (
                "/dicomweb/studies",
                f'multipart/related; type="application/dicom"; boundary={boundary}',
                related,
            ),
        ):
            declared = small.post(path, content=body, headers={**auth, "Content-Type": ctype})
            chunked = small.post(
                path,
                content=iter([body[:1000], body[1000:]]),  # no Content-Length
                headers={**auth, "Content-Type": ctype},
            )
            for r in (declared, chunked):
                assert r.status_code == 413, (path, r.text)
                assert "limit" in r.json()["detail"]
    assert _objects(storage_dir) == objects


def test_a_person_with_a_bearer_token_can_upload(
    settings_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    # A person's id is not an api_keys row: the study records no key, the audit the person.
    issuer = Issuer()
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    fields.update(
        oidc_issuer=issuer.issuer,
        oidc_audience=issuer.audience,
        oidc_jwks_file=str(issuer.write_jwks(tmp_path / "jwks.json")),
    )
    with psycopg.connect(database_url) as conn:
        ensure_tenant(conn, "tenant-ingest-person")
    token = issuer.mint("carol", role="uploader", tenant="tenant-ingest-person")
    study_uid = generate_uid()
    (data,) = _instances(study_uid, 1)
    with TestClient(create_app(ApiSettings(**fields))) as client:
        r = client.post(
            "/v1/studies",
            content=data,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/dicom"},
        )
    assert r.status_code == 202, r.text
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT created_by FROM studies WHERE study_uid = %s", (study_uid,)
        ).fetchone()
        audited = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'study.upload'"
            " AND principal = 'person:carol' AND resource_id = %s",
            (r.json()["id"],),
        ).fetchone()
    assert row == (None,)
    assert audited == (1,)
