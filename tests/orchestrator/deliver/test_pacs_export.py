"""Report export to a real Orthanc (Debian `orthanc` + `orthanc-dicomweb`, started here on
loopback ports with a temporary configuration): the SR goes in over STOW-RS and comes back
out over QIDO-RS and WADO-RS unchanged."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from orchestrator.samples import load_samples

pytestmark = pytest.mark.integration

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TENANT = "tenant-pacs"
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert ORTHANC.exists() and DICOMWEB_PLUGIN.exists(), (
        "install Debian's orthanc and orthanc-dicomweb (scripts/apt-packages.txt)"
    )
    work = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "medtriage-test",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen([str(ORTHANC), str(work / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if "dicom-web" in httpx.get(f"{url}/plugins", timeout=2).json():
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (work / "orthanc.log").read_text()
        assert time.monotonic() < deadline, "Orthanc did not start"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    shutil.rmtree(work / "db", ignore_errors=True)


def _multipart_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer (WADO-RS)."""
    ctype = response.headers["content-type"]
    boundary = next(
        p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")
    )
    parts = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body.removesuffix(b"\r\n"))
    return parts


def test_sr_export_to_orthanc_over_stow_rs(
    stack: Any, make_key: Any, review_study: Any, orthanc: str, database_url: str
) -> None:
    uploader = make_key("uploader", tenant=TENANT)
    admin = {"Authorization": f"Bearer {make_key('admin', tenant=TENANT)}"}
    reviewer = {"Authorization": f"Bearer {make_key('reviewer', tenant=TENANT)}"}
    c = httpx.Client(base_url=stack.api_url, timeout=60)
    images, _ = load_samples()
    study_id = review_study(c, uploader, images[7])

    # No target yet: a clear 404.
    r = c.post(f"/v1/studies/{study_id}/report/export", json={}, headers=reviewer)
    assert r.status_code == 404 and "PACS target" in r.json()["detail"]
    r = c.post(
        "/v1/pacs-targets",
        json={"name": "orthanc", "stow_url": f"{orthanc}/dicom-web", "allow_http": True},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    dead_port = _free_port()
    r = c.post(
        "/v1/pacs-targets",
        json={
            "name": "nowhere",
            "stow_url": f"http://127.0.0.1:{dead_port}/dicom-web",
            "allow_http": True,
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    bad = c.post("/v1/pacs-targets", json={"name": "x", "stow_url": "file:///etc"}, headers=admin)
    assert bad.status_code == 400

    r = c.post(
        f"/v1/studies/{study_id}/report/export", json={"target": "orthanc"}, headers=reviewer
    )
    assert r.status_code == 200, r.text
    (export,) = r.json()["exports"]
    assert export["outcome"] == "ok" and export["revision"] == 1, export
    sr = c.get(
        f"/v1/studies/{study_id}/report",
        params={"format": "sr"},
        headers={"Authorization": f"Bearer {uploader}"},
    ).content
    ours = pydicom.dcmread(io.BytesIO(sr))
    assert export["sop_instance_uid"] == ours.SOPInstanceUID

    # Out of Orthanc again: QIDO-RS finds it in the source study, WADO-RS returns it.
    qido = httpx.get(
        f"{orthanc}/dicom-web/studies/{ours.StudyInstanceUID}/instances",
        params={"SOPInstanceUID": ours.SOPInstanceUID},
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert qido.status_code == 200, qido.text
    (found,) = qido.json()
    assert found["00080016"]["Value"] == [Comprehensive3DSRStorage]
    series = found["0020000E"]["Value"][0]
    wado = httpx.get(
        f"{orthanc}/dicom-web/studies/{ours.StudyInstanceUID}/series/{series}"
        f"/instances/{ours.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert wado.status_code == 200
    (part,) = _multipart_parts(wado)
    theirs = pydicom.dcmread(io.BytesIO(part))
    assert theirs.SOPInstanceUID == ours.SOPInstanceUID
    assert theirs.ContentSequence == ours.ContentSequence
    assert theirs.CurrentRequestedProcedureEvidenceSequence == (
        ours.CurrentRequestedProcedureEvidenceSequence
    )

    # An unreachable PACS: 502 when every target fails, and the failure is recorded.
    r = c.post(
        f"/v1/studies/{study_id}/report/export", json={"target": "nowhere"}, headers=reviewer
    )
    assert r.status_code == 502 and "nowhere" in r.json()["detail"]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT target, revision, outcome, sop_instance_uid FROM report_exports"
            " WHERE study_id = %s ORDER BY at",
            (study_id,),
        ).fetchall()
    assert rows == [
        ("orthanc", 1, "ok", ours.SOPInstanceUID),
        ("nowhere", 1, "failed", ours.SOPInstanceUID),
    ]
    # Only reviewers (and admins) export.
    uploaders = {"Authorization": f"Bearer {uploader}"}
    r = c.post(f"/v1/studies/{study_id}/report/export", json={}, headers=uploaders)
    assert r.status_code == 403
