"""The API in-process (real PostgreSQL, Redis and object store): auth on every route,
bad input answered per file with nothing half-stored, readiness naming what is down."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file

from orchestrator.api import create_app
from orchestrator.api.app import PUBLIC_PATHS, iter_routes
from orchestrator.api.deps import refused_keys
from orchestrator.settings import ApiSettings

pytestmark = pytest.mark.integration


def _app(env: dict[str, str], **overrides: Any) -> TestClient:
    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in env.items()}
    fields.update(overrides)
    return TestClient(create_app(ApiSettings(**fields)))


@pytest.fixture(scope="module")
def api(settings_env: dict[str, str]) -> Iterator[TestClient]:
    with _app(settings_env) as client:
        yield client


def _concrete(path: str) -> str:
    return (
        path.replace("{study_id}", "00000000-0000-0000-0000-000000000000")
        .replace("{instance_id}", "00000000-0000-0000-0000-000000000001")
        .replace("{model}", "triage")
        .replace("{version}", "1")
    )


def test_every_non_public_route_refuses_missing_and_wrong_keys(api: TestClient) -> None:
    routes = list(iter_routes(api.app.routes))
    protected = [(path, methods) for path, methods in routes if path not in PUBLIC_PATHS]
    # Every route FastAPI documents is in the walk (the walker misses nothing).
    documented = set(api.app.openapi()["paths"])
    assert documented <= {path for path, _ in routes}
    assert len(protected) >= 10
    for path, methods in protected:
        for method in methods:
            for headers in ({}, {"Authorization": "Bearer mt_0000_wrong"}, {"X-API-Key": "nope"}):
                response = api.request(method, _concrete(path), headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert "API key" in response.json()["detail"]


def test_failed_logins_are_audited(api: TestClient, database_url: str) -> None:
    # Audited in aggregate per source and interval (test_refusals.py): flush the interval.
    services = api.app.state.services  # type: ignore[attr-defined]
    refused_keys(services).flush(services.pool, force=True)
    with psycopg.connect(database_url) as conn:
        before = conn.execute(
            "SELECT coalesce(sum((detail->>'count')::int), 0) FROM audit_log"
            " WHERE action = 'authenticate' AND outcome = 'denied'"
        ).fetchone()[0]
    api.get("/v1/studies", headers={"Authorization": "Bearer mt_abc_def"})
    refused_keys(services).flush(services.pool, force=True)
    with psycopg.connect(database_url) as conn:
        after = conn.execute(
            "SELECT coalesce(sum((detail->>'count')::int), 0) FROM audit_log"
            " WHERE action = 'authenticate' AND outcome = 'denied'"
        ).fetchone()[0]
    assert after == before + 1


def test_role_without_upload_right_is_refused(api: TestClient, make_key: Any) -> None:
    reviewer = make_key("reviewer")
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    response = api.post(
        "/v1/studies",
        files=[("files", ("ct.dcm", data, "application/dicom"))],
        headers={"Authorization": f"Bearer {reviewer}"},
    )
    assert response.status_code == 403


def _counts(database_url: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        studies = conn.execute("SELECT count(*) FROM studies").fetchone()[0]
        instances = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    return studies, instances


def _objects(storage_dir: Path) -> set[Path]:
    return {p for p in storage_dir.rglob("*") if p.is_file()}


def _no_pixels() -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".99"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("filename", "data", "category"),
    [
        ("notes.txt", b"this is not DICOM at all", "not_dicom"),
        ("empty.dcm", b"", "not_dicom"),
        ("nopixels.dcm", _no_pixels(), "no_pixel_data"),
    ],
    ids=["non-dicom", "empty", "no-pixel-data"],
)
def test_bad_file_alone_is_4xx_naming_file_and_reason_and_stores_nothing(
    api: TestClient,
    make_key: Any,
    database_url: str,
    storage_dir: Path,
    filename: str,
    data: bytes,
    category: str,
) -> None:
    key = make_key("uploader")
    before, objects = _counts(database_url), _objects(storage_dir)
    response = api.post(
        "/v1/studies",
        files=[("files", (filename, data, "application/dicom"))],
        headers={"Authorization": f"Bearer {key}"},
    )
    assert 400 <= response.status_code < 500
    assert filename in response.json()["detail"]
    assert _counts(database_url) == before
    assert _objects(storage_dir) == objects


def test_bad_file_does_not_fail_the_good_ones(
    api: TestClient, make_key: Any, database_url: str
) -> None:
    key = make_key("uploader", tenant="tenant-mixed")
    good = Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()
    response = api.post(
        "/v1/studies",
        files=[
            ("files", ("junk.bin", b"\x00" * 300, "application/octet-stream")),
            ("files", ("mr.dcm", good, "application/dicom")),
            ("files", ("nopixels.dcm", _no_pixels(), "application/dicom")),
        ],
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 202, response.text
    outcomes = {f["filename"]: f for f in response.json()["files"]}
    assert outcomes["mr.dcm"]["outcome"] == "accepted"
    assert outcomes["junk.bin"]["outcome"] == "rejected"
    assert outcomes["junk.bin"]["category"] == "not_dicom"
    assert outcomes["nopixels.dcm"]["outcome"] == "rejected"
    with psycopg.connect(database_url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM instances WHERE study_id = %s", (response.json()["id"],)
        ).fetchone()[0]
    assert n == 1
    # Sending the same instance again is reported as a duplicate, not stored twice.
    again = api.post(
        "/v1/studies",
        files=[("files", ("mr.dcm", good, "application/dicom"))],
        headers={"Authorization": f"Bearer {key}"},
    )
    assert again.status_code == 202
    assert again.json()["files"][0]["outcome"] == "duplicate"


def test_empty_upload_is_400(api: TestClient, make_key: Any) -> None:
    key = make_key("uploader")
    response = api.post("/v1/studies", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code in (400, 422)
    assert "files" in response.text


def test_other_tenants_study_is_404(api: TestClient, make_key: Any) -> None:
    mine = make_key("uploader", tenant="tenant-x")
    theirs = make_key("uploader", tenant="tenant-y")
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    created = api.post(
        "/v1/studies",
        files=[("files", ("ct.dcm", data, "application/dicom"))],
        headers={"Authorization": f"Bearer {mine}"},
    )
    assert created.status_code == 202
    study_id = created.json()["id"]
    assert (
        api.get(f"/v1/studies/{study_id}", headers={"Authorization": f"Bearer {mine}"}).status_code
        == 200
    )
    assert (
        api.get(
            f"/v1/studies/{study_id}", headers={"Authorization": f"Bearer {theirs}"}
        ).status_code
        == 404
    )


def test_readyz_ready_with_everything_up(api: TestClient) -> None:
    response = api.get("/readyz")
    assert response.status_code == 200, response.json()
    assert response.json()["down"] == []


def test_readyz_names_triton_when_it_is_down(settings_env: dict[str, str]) -> None:
    with _app(settings_env, triton_http_url="http://127.0.0.1:9") as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["down"] == ["triton"]


def test_readyz_names_postgres_and_redis_when_down(settings_env: dict[str, str]) -> None:
    with _app(
        settings_env,
        database_url="postgresql://postgres@127.0.0.1:9/none",
        redis_url="redis://127.0.0.1:9/0",
        readiness_timeout_s=1.0,
    ) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert set(response.json()["down"]) == {"postgresql", "redis"}
        assert client.get("/healthz").status_code == 200
