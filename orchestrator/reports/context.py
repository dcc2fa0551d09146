"""What renderers need beyond the JSON report: preview JPEGs and source DICOM headers."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from orchestrator.store.objects import ObjectStore


@dataclass
class ReportContext:
    report: dict[str, Any]
    # instance id -> JPEG preview bytes
    previews: dict[str, bytes] = field(default_factory=dict)
    # instance id -> source DICOM header (no pixel data)
    sources: dict[str, Dataset] = field(default_factory=dict)


def load(
    store: ObjectStore,
    report: dict[str, Any],
    instances: list[dict[str, Any]],
    *,
    previews: bool = True,
    sources: bool = False,
) -> ReportContext:
    ctx = ReportContext(report)
    for row in instances:
        iid = str(row["id"])
        if previews and row.get("preview_key"):
            ctx.previews[iid] = store.get(row["preview_key"])
        if sources and row.get("status") != "failed":
            # Only the header is needed to reference a source instance; never decode pixels.
            ctx.sources[iid] = pydicom.dcmread(
                io.BytesIO(store.get(row["object_key"])), stop_before_pixels=True, force=True
            )
    return ctx
