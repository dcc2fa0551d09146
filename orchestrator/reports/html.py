"""The report as one self-contained HTML page (previews inlined as data: URIs)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from orchestrator.reports.context import ReportContext

DISCLAIMER = "AI-generated, not a diagnosis."


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _findings(findings: list[dict[str, Any]] | None) -> str:
    if not findings:
        return "—"
    return "; ".join(
        f"{_e(f.get('code'))} {float(f.get('probability', 0.0)):.2f}"
        + (f" ({_e(f['attention'])})" if f.get("attention") else "")
        for f in findings
    )


def review_line(review: dict[str, Any] | None) -> str:
    """The review state in words (plain text; shared with the PDF)."""
    if not review:
        return "Not sent to review."
    reasons = ", ".join(review.get("reasons") or [])
    if review.get("status") != "closed" or not review.get("verdict"):
        return f"Awaiting clinician review ({reasons})."
    if review["verdict"] == "override":
        return f"Reviewed: overridden, correct label {review['correct_label']} ({reasons})."
    return f"Reviewed: the clinician agreed with the model ({reasons})."


def render(ctx: ReportContext, revision: int) -> bytes:
    report = ctx.report
    study = report["study"]
    blocks = []
    for n, inst in enumerate(report["instances"], start=1):
        jpeg = ctx.previews.get(str(inst["id"]))
        img = (
            f'<img alt="Preview of image {n}" width="256" '
            f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
            if jpeg
            else "<p>No preview.</p>"
        )
        rows = "".join(
            f"<tr><td>{_e(r['model'])}</td><td>{_e(r['version'])}</td><td>{_e(r['arm'])}</td>"
            f"<td>{_e(r['label'])}</td><td>{float(r['confidence']):.4f}</td>"
            f"<td>{_findings(r['findings'])}</td></tr>"
            for r in inst["results"]
        )
        problem = f"<p>Error: {_e(inst['error'])}</p>" if inst.get("error") else ""
        blocks.append(
            f'<section class="instance"><h2>Image {n} ({_e(inst["modality"])})</h2>{img}'
            f"<p>SOP Instance UID <code>{_e(inst['sop_instance_uid'])}</code>; warnings: "
            f"{_e(', '.join(inst['warnings']) or 'none')}</p>{problem}"
            "<table><thead><tr><th>Model</th><th>Version</th><th>Arm</th><th>Label</th>"
            f"<th>Confidence</th><th>Findings</th></tr></thead><tbody>{rows}</tbody></table>"
            "</section>"
        )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>medtriage report {_e(study['id'])} r{revision}</title>"
        "<style>body{font:14px/1.4 sans-serif;margin:2rem}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:.2rem .5rem}.disclaimer{font-weight:bold;"
        "color:#a00}</style></head><body>"
        f'<p class="disclaimer">{DISCLAIMER} {_e(report.get("disclaimer"))}</p>'
        f"<h1>AI triage report</h1><p>Study <code>{_e(study['study_instance_uid'])}</code>"
        f" · status {_e(study['status'])} · priority {_e(study['priority'])} · revision "
        f"{revision} · generated {_e(report.get('generated_at'))}</p>"
        f'<p id="review">{_e(review_line(report.get("review")))}</p>'
        f"{''.join(blocks)}"
        f'<p class="disclaimer">{DISCLAIMER}</p></body></html>'
    )
    return page.encode()
