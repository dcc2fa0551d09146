"""Report renderings beside the JSON report (``orchestrator.reports.report``, ``medtriage.report/1``).

The JSON form is documented by ``report.schema.json`` (JSON Schema 2020-12). Every format is
rendered from one stored JSON revision, so all formats of a revision say
the same thing: ``html`` (self-contained page), ``pdf`` (reportlab), ``sr`` (DICOM
Comprehensive 3D SR with a TID1500 measurement report, highdicom), ``sc`` (DICOM Secondary
Capture: the previews with the findings drawn on them).
"""

from __future__ import annotations

from pathlib import Path

# JSON Schema of the JSON report (``medtriage.report/1``), shipped with the package.
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")

# Format -> content type of GET /v1/studies/{id}/report?format=...
CONTENT_TYPES = {
    "json": "application/json",
    "html": "text/html; charset=utf-8",
    "pdf": "application/pdf",
    "sr": "application/dicom",
    "sc": "application/dicom",
}
# Format -> object key extension.
EXTENSIONS = {"json": "json", "html": "html", "pdf": "pdf", "sr": "sr.dcm", "sc": "sc.dcm"}
FORMATS = tuple(CONTENT_TYPES)
