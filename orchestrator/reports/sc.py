"""The report as a DICOM Secondary Capture: every preview side by side with the findings drawn
on it, for viewers that show images but not structured reports.

Each tile is one image's JPEG preview with its live results written underneath (no
locations: the models were not validated for localisation, orchestrator/triage/findings.py). A banner
says the image is AI output and not a diagnosis. The SC joins the source study (patient and
study modules from the first source) and lists the sources in (0008,2112) Source Image
Sequence.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from orchestrator.reports.context import ReportContext
from orchestrator.reports.sr import MANUFACTURER, evidence

TILE = 384  # edge of one preview tile, pixels
CAPTION_LINE = 22  # pixels per caption line
BANNER = 36
SERIES_NUMBER = 9702
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()


def _tile(jpeg: bytes | None, results: list[dict[str, Any]], lines: int) -> np.ndarray:
    canvas = np.zeros((TILE + lines * CAPTION_LINE + 8, TILE, 3), np.uint8)
    if jpeg:
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if img is not None:
            canvas[:TILE] = cv2.cvtColor(cv2.resize(img, (TILE, TILE)), cv2.COLOR_BGR2RGB)
    captions = [
        f"{r['model']} v{r['version']} {r['arm']}: {r['label']} {float(r['confidence']):.2f}"
        for r in results
    ]
    for i, text in enumerate(captions[:lines]):
        y = TILE + (i + 1) * CAPTION_LINE
        cv2.putText(canvas, _ascii(text), (6, y), _FONT, 0.5, _WHITE, 1, cv2.LINE_AA)
    return canvas


def _source_refs(sources: list[Dataset]) -> list[Dataset]:
    refs = []
    for s in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = s.SOPClassUID
        ref.ReferencedSOPInstanceUID = s.SOPInstanceUID
        refs.append(ref)
    return refs


def render(ctx: ReportContext, revision: int) -> bytes:
    report = ctx.report
    shown = [i for i in report["instances"] if str(i["id"]) in ctx.sources]
    if not shown:
        raise ValueError("no source instance: the Secondary Capture needs at least one image")
    lines = max(1, max(len(i["results"]) for i in shown))
    tiles = [_tile(ctx.previews.get(str(i["id"])), i["results"], lines) for i in shown]
    body = np.concatenate(tiles, axis=1)
    banner = np.zeros((BANNER, body.shape[1], 3), np.uint8)
    cv2.putText(
        banner, "AI-generated, not a diagnosis", (6, 25), _FONT, 0.7, (255, 255, 0), 2, cv2.LINE_AA
    )
    pixels = np.ascontiguousarray(np.concatenate([banner, body], axis=0))
    sources = [evidence(ctx.sources[str(i["id"])]) for i in shown]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[0],
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=str(generate_uid()),
        series_number=SERIES_NUMBER,
        sop_instance_uid=str(generate_uid()),
        instance_number=revision,
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation for patient images; the real one is set below.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="AI triage findings, not a diagnosis",
    )
    # The tiles keep their sources' orientation when those say it; otherwise it is unknown
    # (Type 2: present and empty), never guessed.
    sc.PatientOrientation = sources[0].get("PatientOrientation", "")
    # Type 2C, likewise: the source's laterality when it has one, else empty (unknown).
    sc.Laterality = sources[0].get("Laterality", "")
    sc.SourceImageSequence = _source_refs(sources)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    buf = BytesIO()
    sc.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
