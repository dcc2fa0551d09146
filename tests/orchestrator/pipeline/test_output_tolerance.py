"""Issue 15 item 11: a non-conformant source value (PatientBirthDate "1975-03-14") made
``report?format=sr`` and ``sc`` answer 500, and pydicom's warnings put the value in the log.
The renderers run here on a hand-made report context (the real highdicom, the real
pydicom); the log goes through the filter the CLI installs."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from orchestrator.privacy import logfilter
from orchestrator.reports import sc, sr
from orchestrator.reports.context import ReportContext
from orchestrator.reports.source_header import normalise
from orchestrator.samples import load_samples, radiograph

BIRTH_DATE = "1975-03-14"


@pytest.fixture
def filtered_log() -> Iterator[io.StringIO]:
    """The root logger with a handler as the CLI sets it up (PhiFilter installed)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.WARNING)
    logfilter.install(root)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.captureWarnings(False)


def _context(**tags: str) -> ReportContext:
    images, _ = load_samples()
    ds = dcmread(io.BytesIO(radiograph(images[0], study_uid=generate_uid(), size=64)))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    # As context.load reads a stored source: its header only.
    source = dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True, force=True)
    result = {"model": "triage", "version": 1, "arm": "live", "label": "normal", "confidence": 0.9}
    report = {"instances": [{"id": "i1", "results": [result]}], "review": None}
    return ReportContext(report, previews={}, sources={"i1": source})


@pytest.mark.parametrize("renderer", [sr, sc], ids=["sr", "sc"])
def test_outputs_tolerate_a_non_conformant_birth_date(
    renderer: object, filtered_log: io.StringIO
) -> None:
    ctx = _context(PatientBirthDate=BIRTH_DATE, StudyTime="12:30:00")
    out = renderer.render(ctx, 1)  # type: ignore[attr-defined]
    ds = dcmread(io.BytesIO(out))
    assert ds.PatientBirthDate == "19750314" and ds.StudyTime == "123000"
    text = filtered_log.getvalue()
    assert "PatientBirthDate" in text and "repaired" in text
    assert BIRTH_DATE not in text


def test_an_unguessable_value_is_left_empty() -> None:
    ds = pydicom.Dataset()
    ds.PatientBirthDate = "03/14/1975"
    ds.StudyDate = "20260101"
    normalise(ds, required=("PatientBirthDate",))
    assert ds.PatientBirthDate == "" and ds.StudyDate == "20260101"


def test_pydicom_warnings_reach_the_log_without_the_value(filtered_log: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytest's own capture; the log record is the point
        pydicom.valuerep.validate_value("DA", BIRTH_DATE, pydicom.config.WARN)
        pydicom.valuerep.validate_value("PN", "SECRET^PATIENT\x01", pydicom.config.WARN)
    text = filtered_log.getvalue()
    assert "Invalid value for VR DA" in text
    assert BIRTH_DATE not in text and "SECRET" not in text
