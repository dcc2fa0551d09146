"""Reports over the real stack: JSON, HTML, PDF and DICOM SR of one study, the SR checked by
validators no one here wrote (dicom3tools' dciodvfy, DCMTK's dsrdump), and a new revision
after a reviewer's override with the old one kept."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psycopg
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from orchestrator.reports import SCHEMA_FILE
from orchestrator.samples import load_samples

pytestmark = pytest.mark.integration

TENANT = "tenant-reports"
DISCLAIMER = "AI-generated, not a diagnosis"
SCHEMA = json.loads(SCHEMA_FILE.read_text())


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install the Debian packages in scripts/apt-packages.txt"
    return path


def _pdf_text(data: bytes) -> str:
    """Every content stream decoded (reportlab writes ASCII85 + Flate, or Flate alone), enough
    to find the strings its text operators show."""
    out = []
    for m in re.finditer(rb"stream\r?\n(.*?)\s*endstream", data, re.S):
        raw = m.group(1).strip()
        for decode in (
            lambda b: zlib.decompress(base64.a85decode(b.removesuffix(b"~>"))),
            zlib.decompress,
        ):
            try:
                out.append(decode(raw).decode("latin-1"))
                break
            except (ValueError, zlib.error):
                continue
    return "".join(out)


@pytest.fixture(scope="module")
def world(stack: Any, make_key: Any, database_url: str, review_study: Any) -> dict[str, Any]:
    images, _ = load_samples()
    uploader = make_key("uploader", tenant=TENANT)
    client = httpx.Client(
        base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {uploader}"}
    )
    study_id = review_study(client, uploader, images[4])
    with psycopg.connect(database_url) as conn:
        sop_uid, sop_class, study_uid = conn.execute(
            "SELECT i.sop_uid, i.sop_class_uid, s.study_uid FROM instances i"
            " JOIN studies s ON s.id = i.study_id WHERE i.study_id = %s",
            (study_id,),
        ).fetchone()
        results = conn.execute(
            "SELECT model, version, arm, label, confidence FROM results WHERE study_id = %s",
            (study_id,),
        ).fetchall()
        case_id = conn.execute(
            "SELECT id FROM review_cases WHERE study_id = %s", (study_id,)
        ).fetchone()[0]
    return {
        "client": client,
        "study_id": study_id,
        "sop_uid": sop_uid,
        "sop_class": sop_class,
        "study_uid": study_uid,
        "results": results,
        "case_id": str(case_id),
        "reviewer": make_key("reviewer", tenant=TENANT),
        "db": database_url,
    }


def _get(world: dict[str, Any], fmt: str, **params: Any) -> httpx.Response:
    r = world["client"].get(
        f"/v1/studies/{world['study_id']}/report", params={"format": fmt, **params}
    )
    assert r.status_code == 200, r.text
    return r


def _check_sr(world: dict[str, Any], data: bytes, tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    # dciodvfy checks the object against the IOD and module definitions; warnings are
    # allowed (our private 99MEDTRIAGE code, an empty Study ID copied from the source).
    vfy = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (vfy.stdout + vfy.stderr).splitlines()
    assert "Comprehensive3DSR" in lines, lines
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], errors
    dump = subprocess.run(
        [_tool("dsrdump"), "+Pu", "+Pl", str(path)], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert not re.search(r"^(E|F):", dump.stderr, re.M), dump.stderr
    text = dump.stdout
    assert "Comprehensive 3D SR Document" in text
    assert '<CONTAINER:(,,"Imaging Measurement Report")=CONTINUOUS>' in text
    assert world["sop_uid"] in text  # the source image is referenced
    for model, version, arm, _, _ in world["results"]:
        assert f'"image 1 {model} v{version} {arm}"' in text
        assert f'(,,"Algorithm Parameters")="arm={arm}"' in text
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.StudyInstanceUID == world["study_uid"]
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [
        (world["sop_class"], world["sop_uid"])
    ]
    return text


def _check_sc(world: dict[str, Any], data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "r1.sc.dcm"
    path.write_bytes(data)
    vfy = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (vfy.stdout + vfy.stderr).splitlines()
    assert "SCImage" in lines, lines
    assert [line for line in lines if line.startswith("Error")] == [], lines
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.StudyInstanceUID == world["study_uid"] and ds.BurnedInAnnotation == "YES"
    (ref,) = ds.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        world["sop_class"],
        world["sop_uid"],
    )
    pixels = ds.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[1] >= 256
    # The banner is drawn in yellow (R and G high, B low) above the preview.
    banner = pixels[:36].reshape(-1, 3).astype(int)
    assert ((banner[:, 0] > 200) & (banner[:, 1] > 200) & (banner[:, 2] < 80)).sum() > 100


def test_every_format_of_the_first_revision(world: dict[str, Any], tmp_path: Path) -> None:
    j = _get(world, "json")
    assert j.headers["content-type"] == "application/json"
    assert j.json()["schema"] == "medtriage.report/1"
    jsonschema.validate(j.json(), SCHEMA)  # the documented schema holds
    assert j.headers["x-report-revision"] == "1"

    h = _get(world, "html")
    assert h.headers["content-type"] == "text/html; charset=utf-8"
    page = h.text
    assert DISCLAIMER in page
    assert "data:image/jpeg;base64,/9j/" in page  # the preview, inlined
    for model, version, arm, label, confidence in world["results"]:
        row = (
            f"<tr><td>{model}</td><td>{version}</td><td>{arm}</td><td>{label}</td>"
            f"<td>{confidence:.4f}</td>"
        )
        assert row in page
    assert "Awaiting clinician review" in page and "lossy_source" in page

    p = _get(world, "pdf")
    assert p.headers["content-type"] == "application/pdf"
    assert p.content.startswith(b"%PDF-") and b"/Subtype /Image" in p.content
    text = _pdf_text(p.content)
    assert DISCLAIMER in text
    for model, _, _, label, confidence in world["results"]:
        assert f"({model})" in text and f"({confidence:.4f})" in text and f"({label})" in text

    s = _get(world, "sr")
    assert s.headers["content-type"] == "application/dicom"
    assert "attachment" in s.headers["content-disposition"]
    dump = _check_sr(world, s.content, tmp_path, "r1.sr.dcm")
    assert "Label after clinician review" not in dump
    # Stored once: the same bytes on the next request.
    assert _get(world, "sr").content == s.content
    sc = _get(world, "sc")
    assert sc.headers["content-type"] == "application/dicom"
    _check_sc(world, sc.content, tmp_path)
    bad = world["client"].get(f"/v1/studies/{world['study_id']}/report", params={"format": "docx"})
    assert bad.status_code == 422
    missing = world["client"].get(
        f"/v1/studies/{world['study_id']}/report", params={"format": "json", "revision": 9}
    )
    assert missing.status_code == 404


def test_override_makes_a_new_revision_and_keeps_the_old(
    world: dict[str, Any], tmp_path: Path
) -> None:
    first_sr = _get(world, "sr").content
    live = {
        label for model, _, arm, label, _ in world["results"] if (model, arm) == ("triage", "live")
    }
    (live_label,) = live
    truth = "pneumonia" if live_label == "normal" else "normal"
    reviewer = {"Authorization": f"Bearer {world['reviewer']}"}
    c = world["client"]
    assert c.post(f"/v1/review/cases/{world['case_id']}/claim", headers=reviewer).is_success
    r = c.post(
        f"/v1/review/cases/{world['case_id']}/verdict",
        json={"verdict": "override", "correct_label": truth},
        headers=reviewer,
    )
    assert r.status_code == 200 and r.json()["report_revision"] == 2, r.text

    j = _get(world, "json")
    assert j.headers["x-report-revision"] == "2"
    assert (j.json()["review"]["verdict"], j.json()["review"]["correct_label"]) == (
        "override",
        truth,
    )
    jsonschema.validate(j.json(), SCHEMA)
    assert f"overridden, correct label {truth}" in _get(world, "html").text
    assert f"overridden, correct label {truth}" in _pdf_text(_get(world, "pdf").content)
    s = _get(world, "sr")
    assert s.headers["x-report-revision"] == "2"
    dump = _check_sr(world, s.content, tmp_path, "r2.sr.dcm")
    assert '(,,"Label after clinician review")' in dump
    assert pydicom.dcmread(io.BytesIO(s.content)).PreliminaryFlag == "FINAL"
    # Revision 1 is kept, unchanged, in every format.
    old = _get(world, "json", revision=1)
    assert old.json()["review"]["verdict"] is None
    assert _get(world, "sr", revision=1).content == first_sr
    with psycopg.connect(world["db"]) as conn:
        stored = conn.execute(
            "SELECT revision, format FROM reports WHERE study_id = %s ORDER BY 1, 2",
            (world["study_id"],),
        ).fetchall()
    assert stored == [
        (1, "html"),
        (1, "json"),
        (1, "pdf"),
        (1, "sc"),
        (1, "sr"),
        (2, "html"),
        (2, "json"),
        (2, "pdf"),
        (2, "sr"),
    ]
