"""The study report, JSON form (schema ``medtriage.report/1``).

Fields: schema, study (id, status, priority, timings), instances (id, series, sop class,
warnings, error), results per model (version, arm, label, confidence, findings), review
(reasons, status, verdict) and a disclaimer. No patient identifiers beyond what the
client sent as UIDs; names, ids and dates of the patient are never copied in.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

SCHEMA = "medtriage.report/1"
DISCLAIMER = "AI-generated triage output, not a diagnosis. A clinician must review it."


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "hex") and type(value).__name__ == "UUID":
        return str(value)
    return value


def build(
    study: dict[str, Any],
    instances: list[dict[str, Any]],
    results: list[dict[str, Any]],
    review: dict[str, Any] | None,
) -> dict[str, Any]:
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_instance.setdefault(str(r["instance_id"]), []).append(
            {
                "model": r["model"],
                "version": r["version"],
                "arm": r["arm"],
                "label": r["label"],
                "confidence": round(float(r["confidence"]), 4),
                "findings": r["findings"],
            }
        )
    built: dict[str, Any] = _jsonable(
        {
            "schema": SCHEMA,
            "generated_at": datetime.now(UTC),
            "study": {
                "id": study["id"],
                "study_instance_uid": study["study_uid"],
                "status": study["status"],
                "priority": study["priority"],
                "timings_ms": study["timings"],
            },
            "instances": [
                {
                    "id": i["id"],
                    "sop_instance_uid": i["sop_uid"],
                    "modality": i["modality"],
                    "status": i["status"],
                    "warnings": list(i["warnings"]),
                    "error": i["error"],
                    "results": by_instance.get(str(i["id"]), []),
                }
                for i in instances
            ],
            "review": review,
            "disclaimer": DISCLAIMER,
        }
    )
    return built


def to_json_bytes(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=2, sort_keys=True).encode()
