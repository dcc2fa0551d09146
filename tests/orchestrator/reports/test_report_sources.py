"""DICOM reports (SR, SC) from sources that break the standard's value rules: an empty or
unknown (0008,0005) SpecificCharacterSet, dates and times written with separators, dates
that do not exist, lower-case code strings. The report is built from normalised values and
passes dciodvfy; each change is logged by tag, never by value. Over the stack, such a study
answers 200 for ?format=sr and ?format=sc instead of 500."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from orchestrator.reports import sc, sr
from orchestrator.reports.context import ReportContext
from orchestrator.reports.source_header import normalise
from orchestrator.samples import load_samples, radiograph

BIRTH = "1975-03-14"
NAME = "Müller^Jörg"
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0


def _chest_film() -> bytes:
    """A paediatric chest CR film the chest models take (a CT slice is not_applicable)."""
    images, _ = load_samples()
    return radiograph(images[0], study_uid=generate_uid(), size=256)


def _raw(ds: Dataset, keyword_tag: int, vr: str, value: bytes) -> None:
    """Set an element as raw bytes, as a modality wrote it (bypassing pydicom's checks)."""
    ds[keyword_tag] = RawDataElement(Tag(keyword_tag), vr, len(value), value, 0, False, True)


def _source(shape: str) -> bytes:
    """A chest film with one kind of broken header value, written as a file."""
    ds = pydicom.dcmread(io.BytesIO(_chest_film()))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.pop("PatientBirthDate", None)
    if shape in ("empty charset", "all"):
        _raw(ds, 0x00080005, "CS", b"  ")
    if shape == "unknown charset":
        _raw(ds, 0x00080005, "CS", b"ISO_IR 999")
        _raw(ds, 0x00100010, "PN", NAME.encode("utf-8"))
    if shape == "utf-8 name, empty charset":
        _raw(ds, 0x00080005, "CS", b"  ")
        _raw(ds, 0x00100010, "PN", NAME.encode("utf-8"))
    if shape in ("dashed birth date", "all"):
        _raw(ds, 0x00100030, "DA", BIRTH.encode())
    if shape in ("impossible study date", "all"):
        _raw(ds, 0x00080020, "DA", b"20241345")
    if shape in ("colon study time", "all"):
        _raw(ds, 0x00080030, "TM", b"10:20:30")
    if shape in ("lower-case sex", "all"):
        _raw(ds, 0x00100040, "CS", b"m ")
    if shape in ("unrepairable optional date", "all"):
        _raw(ds, 0x00080022, "DA", b"yesterday ")
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


SHAPES = [
    "empty charset",
    "unknown charset",
    "utf-8 name, empty charset",
    "dashed birth date",
    "impossible study date",
    "colon study time",
    "lower-case sex",
    "unrepairable optional date",
    "all",
]


def _context(data: bytes) -> ReportContext:
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    ok, jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    assert ok
    report = {
        "instances": [
            {
                "id": "i1",
                "results": [
                    {
                        "model": "triage",
                        "version": 1,
                        "arm": "live",
                        "label": "normal",
                        "confidence": 0.91,
                        "findings": [],
                    }
                ],
            }
        ],
        "review": None,
    }
    return ReportContext(report, previews={"i1": jpeg.tobytes()}, sources={"i1": header})


def _dciodvfy(data: bytes, tmp_path: Path, iod: str) -> list[str]:
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy is missing: install the Debian packages in scripts/apt-packages.txt"
    path = tmp_path / "out.dcm"
    path.write_bytes(data)
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    assert iod in lines, lines
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPES)
def test_sr_and_sc_build_from_normalised_values(
    shape: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _source(shape)
    ctx = _context(data)
    with caplog.at_level(logging.DEBUG):
        report_sr = sr.render(ctx, 1)
        report_sc = sc.render(ctx, 1)
    assert _dciodvfy(report_sr, tmp_path, "Comprehensive3DSR") == []
    assert _dciodvfy(report_sc, tmp_path, "SCImage") == []
    for out in (report_sr, report_sc):
        ds = pydicom.dcmread(io.BytesIO(out))
        charset = ds.get("SpecificCharacterSet")
        assert charset in (None, "ISO_IR 192"), charset
        if shape in ("dashed birth date", "all"):
            assert ds.PatientBirthDate == "19750314"
        if shape in ("impossible study date", "all"):
            assert ds.StudyDate == ""  # Type 2: present, unknown
        if shape in ("colon study time", "all"):
            assert ds.StudyTime == "102030"
        if shape in ("lower-case sex", "all"):
            assert ds.PatientSex == "M"
        if "name" in shape or shape == "unknown charset":
            assert str(ds.PatientName) == NAME and charset == "ISO_IR 192"
    # Every change was logged by tag, and no logged line holds a header value.
    text = caplog.text
    assert "report source header" in text
    for value in (
        BIRTH,
        "19750314",
        "20241345",
        "10:20:30",
        "yesterday",
        NAME,
        "Müller",
    ):
        assert value not in text, value


def test_normalise_names_tags_not_values() -> None:
    ds = pydicom.dcmread(io.BytesIO(_source("all")), stop_before_pixels=True, force=True)
    warnings = normalise(ds, required=("PatientBirthDate", "StudyDate"))
    assert any("(0010,0030) PatientBirthDate" in w and "repaired" in w for w in warnings)
    assert any("(0008,0020) StudyDate" in w and "emptied" in w for w in warnings)
    assert any("(0008,0022) AcquisitionDate" in w and "removed" in w for w in warnings)
    assert any("(0008,0005) SpecificCharacterSet" in w for w in warnings)
    assert "AcquisitionDate" not in ds and ds.StudyDate == ""


@pytest.mark.integration
def test_report_of_a_non_conformant_source_over_the_stack(stack: Any, make_key: Any) -> None:
    key = make_key("uploader", tenant="tenant-report-sources")
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as c:
        r = c.post("/v1/studies", files=[("files", ("a.dcm", _source("all"), "application/dicom"))])
        assert r.status_code == 202, r.text
        study_id = r.json()["id"]
        deadline = time.monotonic() + WAIT_S
        while c.get(f"/v1/studies/{study_id}").json()["status"] not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        for fmt in ("sr", "sc"):
            got = c.get(f"/v1/studies/{study_id}/report", params={"format": fmt})
            assert got.status_code == 200, (fmt, got.text)
            ds = pydicom.dcmread(io.BytesIO(got.content))
            assert ds.PatientBirthDate == "19750314" and "SpecificCharacterSet" not in ds
