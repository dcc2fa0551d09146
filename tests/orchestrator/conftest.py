"""Fixtures shared by the review tests (test_review.py, test_review_page.py), the PHI
tests (test_deid.py, test_phi.py) and the ingest-level tests (a connection pool)."""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from psycopg_pool import ConnectionPool
from pydicom import dcmread
from pydicom.uid import generate_uid

from orchestrator.samples import radiograph
from orchestrator.store.db import connect_pool

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0


@pytest.fixture(scope="module")
def pool(database_url: str) -> Iterator[ConnectionPool]:
    """A small pool on the test database, for tests that call ingest or the pipeline directly."""
    p = connect_pool(database_url, max_size=2)
    p.wait()
    yield p
    p.close()


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


# Twenty identifying attributes (PS3.15 Annex E) and how to make a unique value for each.
PHI_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "OtherPatientIDs",
    "PatientAddress",
    "StudyID",
    "InstitutionAddress",
    "StationName",
    "OperatorsName",
    "PerformingPhysicianName",
    "PatientTelephoneNumbers",
    "StudyDescription",
    "DeviceSerialNumber",
    "PatientMotherBirthName",
)


def phi_values(study_uid: str, series_uid: str, sop_uid: str) -> dict[str, str]:
    """A fresh, unique value for each of PHI_TAGS (short enough for its VR); a birth date in
    the 1600s, so no timestamp of ours can contain it by chance."""
    tok = secrets.token_hex(4).upper()
    values = {k: f"{k[:5].upper()}{tok}" for k in PHI_TAGS}
    values["PatientName"] = f"PNFAM{tok}^PNGIV{tok}"
    values["ReferringPhysicianName"] = f"REFDR{tok}^X"
    values["OperatorsName"] = f"OPER{tok}^Y"
    values["PerformingPhysicianName"] = f"PERFDR{tok}^Z"
    values["PatientMotherBirthName"] = f"MOTHER{tok}^W"
    values["PatientBirthDate"] = f"16{secrets.randbelow(100):02d}{secrets.randbelow(12) + 1:02d}"
    values["PatientBirthDate"] += f"{secrets.randbelow(28) + 1:02d}"
    values["StudyInstanceUID"], values["SeriesInstanceUID"] = study_uid, series_uid
    values["SOPInstanceUID"] = sop_uid
    return values


def plant_phi(data: bytes, values: dict[str, str]) -> bytes:
    """``data`` (a DICOM file) with ``values`` written into its attributes by keyword."""
    ds = dcmread(io.BytesIO(data))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def phi_radiograph() -> Callable[..., tuple[bytes, dict[str, str]]]:
    """``phi_radiograph(image, study_uid, series_uid, patient=None)``: a radiograph with a
    unique value planted in each of the 20 PHI_TAGS, except the ``patient`` values given
    (PatientID, PatientName, PatientBirthDate of an earlier instance of the study); returns
    (bytes, {keyword: value})."""

    def _make(
        image: Any, study_uid: str, series_uid: str, patient: dict[str, str] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        values = phi_values(study_uid, series_uid, generate_uid())
        # Instances of one study belong to one patient (ingest refuses another's).
        values.update(patient or {})
        base = radiograph(image, study_uid=study_uid, series_uid=series_uid)
        return plant_phi(base, values), values

    return _make
