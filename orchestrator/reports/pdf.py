"""The report as a PDF (reportlab platypus): previews, results, review state, disclaimer."""

from __future__ import annotations

from io import BytesIO
from typing import Any
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
from reportlab.platypus.flowables import Flowable

from orchestrator.reports.context import ReportContext
from orchestrator.reports.html import DISCLAIMER, review_line

# Preview edge on the page.
PREVIEW_MM = 60


def _p(text: Any, style: Any) -> Paragraph:
    # Paragraph takes mini-markup: escape every value.
    return Paragraph(escape("" if text is None else str(text)), style)


def _findings(findings: list[dict[str, Any]] | None) -> str:
    if not findings:
        return "-"
    return "; ".join(f"{f.get('code')} {float(f.get('probability', 0.0)):.2f}" for f in findings)


def render(ctx: ReportContext, revision: int) -> bytes:
    report = ctx.report
    study = report["study"]
    styles = getSampleStyleSheet()
    warn = styles["Heading3"].clone("disclaimer", textColor=colors.darkred)
    story: list[Flowable] = [
        _p(f"{DISCLAIMER} {report.get('disclaimer', '')}", warn),
        _p("AI triage report", styles["Title"]),
        _p(
            f"Study {study['study_instance_uid']} - status {study['status']} - priority "
            f"{study['priority']} - revision {revision}",
            styles["Normal"],
        ),
        _p(review_line(report.get("review")), styles["Normal"]),
        Spacer(1, 4 * mm),
    ]
    for n, inst in enumerate(report["instances"], start=1):
        story.append(_p(f"Image {n} ({inst['modality']})", styles["Heading2"]))
        jpeg = ctx.previews.get(str(inst["id"]))
        if jpeg:
            story.append(Image(BytesIO(jpeg), width=PREVIEW_MM * mm, height=PREVIEW_MM * mm))
        story.append(
            _p(
                f"SOP Instance UID {inst['sop_instance_uid']}; warnings: "
                f"{', '.join(inst['warnings']) or 'none'}"
                + (f"; error: {inst['error']}" if inst.get("error") else ""),
                styles["Normal"],
            )
        )
        rows = [["Model", "Version", "Arm", "Label", "Confidence", "Findings"]] + [
            [
                r["model"],
                str(r["version"]),
                r["arm"],
                r["label"],
                f"{float(r['confidence']):.4f}",
                _findings(r["findings"]),
            ]
            for r in inst["results"]
        ]
        table = Table(rows, hAlign="LEFT")
        table.setStyle(
            TableStyle(
                [
                    ("GRID", (0, 0), (-1, -1), 0.5, colors.grey),
                    ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey),
                ]
            )
        )
        story += [table, Spacer(1, 4 * mm)]
    story.append(_p(DISCLAIMER, warn))
    buf = BytesIO()
    SimpleDocTemplate(
        buf,
        pagesize=A4,
        title=f"medtriage report r{revision}",
        author="medtriage",
        subject=DISCLAIMER,
    ).build(story)
    return buf.getvalue()
