"""Fixtures shared by the review tests (test_review.py, test_review_page.py)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from orchestrator.samples import radiograph

TERMINAL = {"done", "failed", "needs_review"}
WAIT_S = 120.0


def lossy_radiograph(image: Any, study_uid: str, priority: str | None = None) -> bytes:
    """A radiograph flagged (0028,2110) LossyImageCompression = 01: the gate must send it to
    review with reason lossy_source whatever the models say."""
    ds = dcmread(io.BytesIO(radiograph(image, study_uid=study_uid, priority=priority)))
    ds.LossyImageCompression = "01"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload_and_wait(client: httpx.Client, key: str, data: bytes, priority: str = "routine") -> str:
    r = client.post(
        "/v1/studies",
        params={"priority": priority},
        files=[("files", ("x.dcm", data, "application/dicom"))],
        headers=_headers(key),
    )
    assert r.status_code == 202, r.text
    study_id = r.json()["id"]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        body = client.get(f"/v1/studies/{study_id}", headers=_headers(key)).json()
        if body["status"] in TERMINAL:
            assert body["status"] == "needs_review", body
            return str(study_id)
        time.sleep(0.2)
    raise AssertionError(f"study {study_id} not finished in {WAIT_S}s")


@pytest.fixture(scope="session")
def review_study() -> Callable[..., str]:
    """``review_study(client, uploader_key, image, priority=...)``: upload one lossy radiograph
    (a new study) and wait until the gate has sent it to review; returns the study id."""

    def _make(client: httpx.Client, key: str, image: Any, priority: str = "routine") -> str:
        return upload_and_wait(client, key, lossy_radiograph(image, generate_uid()), priority)

    return _make
