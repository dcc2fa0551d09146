"""One study end to end over the real stack: API process, RQ worker process, PostgreSQL,
Redis, the object store and the real Triton binary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psycopg
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import preprocess
from orchestrator.inference.specs import load_repository
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
# Triton (python backend) and a direct ORT session run the same graph on the same tensor.
RESULT_TOLERANCE = 1e-5
WAIT_S = 120.0


def _wait(client: httpx.Client, study_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        body = client.get(f"/v1/studies/{study_id}").json()
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.2)
    raise AssertionError(f"study {study_id} not finished after {WAIT_S}s: {body['status']}")


@pytest.fixture(scope="module")
def client(stack: Any, make_key: Any) -> httpx.Client:
    key = make_key("uploader")
    return httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def _direct_ort(data: bytes, model: str, version: int) -> dict[str, np.ndarray]:
    """What the platform should have stored: our preprocessing + ONNX Runtime, no Triton."""
    spec = load_repository(REPO_ROOT / "model_repository")[model]
    ds = preprocess.read_dicom(data)
    shape = spec.inputs[0].dims
    out = preprocess.preprocess(
        ds, preprocess.PreprocessSpec.from_dict(spec.preprocess), (shape[0], shape[1], shape[2])
    )
    session = ort.InferenceSession(
        str(REPO_ROOT / "model_repository" / model / str(version) / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    values = session.run(None, {session.get_inputs()[0].name: out.tensor[None]})
    # ONNX output order matches the config's output order (the renderer maps by position).
    return {t.name: v[0] for t, v in zip(spec.outputs, values, strict=True)}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"], ids=["ct-small", "mr-small"])
def test_images_no_model_was_made_for_end_not_applicable(client: httpx.Client, name: str) -> None:
    """A CT slice and an MR slice meet no model set's rules: no result, no review, never
    "normal" — the study ends not_applicable and says which rules failed."""
    data = Path(str(get_testdata_file(name))).read_bytes()
    # pydicom's files share StudyInstanceUIDs across runs; the test DB is fresh per session.
    response = client.post("/v1/studies", files=[("files", (name, data, "application/dicom"))])
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["files"][0]["outcome"] in ("accepted", "duplicate")
    study = _wait(client, body["id"])
    assert study["status"] == "not_applicable", study
    instance = study["instances"][0]
    assert instance["status"] == "not_applicable" and instance["results"] == []
    modality = "CT" if name.startswith("CT") else "MR"
    assert f"chest_xr: Modality {modality} is not one of CR, DX" in instance["error"]
    assert f"breast_us: Modality {modality} is not one of US" in instance["error"]
    assert f"fundus: Modality {modality} is not one of OP" in instance["error"]
    assert study["review"] is None
    report = client.get(f"/v1/studies/{body['id']}/report").json()
    assert report["study"]["status"] == "not_applicable"
    assert report["instances"][0]["status"] == "not_applicable"
    # Every report form says so too (no result to draw, nothing to measure).
    for fmt, marker in (("html", b"not_applicable"), ("pdf", b"%PDF")):
        r = client.get(f"/v1/studies/{body['id']}/report", params={"format": fmt})
        assert r.status_code == 200, (fmt, r.text[:300])
        assert marker in r.content, fmt
    # A DICOM SR needs a measurement; with none the answer says why, not a 500.
    sr = client.get(f"/v1/studies/{body['id']}/report", params={"format": "sr"})
    assert sr.status_code == 409 and "not_applicable" in sr.json()["detail"], sr.text


def test_chest_study_end_to_end_matches_direct_onnxruntime(client: httpx.Client) -> None:
    images, _ = load_samples()
    data = radiograph(images[0], study_uid=generate_uid(), size=(640, 512))
    response = client.post("/v1/studies", files=[("files", ("cr.dcm", data, "application/dicom"))])
    assert response.status_code == 202, response.text
    body = response.json()
    study = _wait(client, body["id"])
    assert study["status"] in ("done", "needs_review"), study
    instance = study["instances"][0]
    assert instance["status"] == "done"
    by_model = {r["model"]: r for r in instance["results"]}
    assert set(by_model) == {"triage", "analysis"}
    for model, result in by_model.items():
        expected = _direct_ort(data, model, result["version"])
        for output, values in result["outputs"].items():
            np.testing.assert_allclose(
                np.asarray(values, dtype=np.float32), expected[output], atol=RESULT_TOLERANCE
            )
        assert result["label"] in ("normal", "pneumonia")
        # The label is the decision at the operating point; its probability is the confidence.
        index = ("normal", "pneumonia").index(result["label"])
        assert result["confidence"] == pytest.approx(result["outputs"]["probs"][index], abs=1e-6)
        for finding in result["findings"]:
            assert "zones" not in finding
    for stage in ("queue_wait", "fetch", "preprocess", "triage", "analysis", "report"):
        assert stage in study["timings_ms"], study["timings_ms"]

    preview = client.get(instance["preview"])
    assert preview.status_code == 200
    assert preview.headers["content-type"] == "image/jpeg"
    assert preview.content[:2] == b"\xff\xd8"

    report = client.get(f"/v1/studies/{body['id']}/report").json()
    assert report["schema"] == "medtriage.report/1"
    assert report["study"]["status"] == study["status"]
    assert "not a diagnosis" in report["disclaimer"]


def test_chest_study_several_images_and_stat_priority(client: httpx.Client) -> None:
    images, labels = load_samples()
    uid = generate_uid()
    files = [
        (
            "files",
            (
                f"img{i}.dcm",
                radiograph(images[i], study_uid=uid, instance_number=i, priority="STAT"),
                "application/dicom",
            ),
        )
        for i in range(4)
    ]
    response = client.post("/v1/studies", files=files)
    assert response.status_code == 202, response.text
    assert [f["outcome"] for f in response.json()["files"]] == ["accepted"] * 4
    study = _wait(client, response.json()["id"])
    assert study["priority"] == "stat"
    assert study["status"] in ("done", "needs_review")
    assert len(study["instances"]) == 4
    # The same version for every image of one study (sticky routing).
    versions = {(r["model"], r["version"]) for i in study["instances"] for r in i["results"]}
    assert len({m for m, _ in versions}) == 2 and len(versions) == 2


def test_reads_are_audited_and_listing_pages(client: httpx.Client, database_url: str) -> None:
    listing = client.get("/v1/studies", params={"limit": 1}).json()
    assert listing["total"] >= 1 and len(listing["items"]) == 1
    second = client.get("/v1/studies", params={"limit": 1, "offset": 1}).json()
    if listing["total"] > 1:
        assert second["items"][0]["id"] != listing["items"][0]["id"]
    study_id = listing["items"][0]["id"]
    with psycopg.connect(database_url) as conn:
        before = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'study.read' AND resource_id = %s",
            (study_id,),
        ).fetchone()[0]
    assert client.get(f"/v1/studies/{study_id}").status_code == 200
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), max(principal) FROM audit_log"
            " WHERE action = 'study.read' AND resource_id = %s",
            (study_id,),
        ).fetchone()
    assert row[0] == before + 1
    assert row[1] == "test-uploader"
