"""Every read of patient data through the real API leaves an audit row: each route that
returns a study, a preview, a report or a review case is called with its own request id,
and the audit table must hold a row for each, naming the principal and the resource."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from orchestrator.samples import load_samples

pytestmark = pytest.mark.integration

TENANT = "tenant-audit-reads"
REPORT_FORMATS = ("json", "html", "pdf", "sr", "sc")


def test_every_patient_data_read_is_audited(
    stack: Any, make_key: Any, review_study: Any, database_url: str
) -> None:
    uploader = make_key("uploader", tenant=TENANT)
    reviewer = make_key("reviewer", tenant=TENANT)
    c = httpx.Client(base_url=stack.api_url, timeout=60)
    images, _ = load_samples()
    study_id = review_study(c, uploader, images[3])
    as_uploader = {"Authorization": f"Bearer {uploader}"}
    as_reviewer = {"Authorization": f"Bearer {reviewer}"}
    study = c.get(f"/v1/studies/{study_id}", headers=as_uploader).json()
    instance_id = study["instances"][0]["id"]
    (case,) = [
        item
        for item in c.get("/v1/review/queue", headers=as_reviewer).json()["items"]
        if str(item.get("study_id")) == study_id
    ]
    case_id = case["id"]

    reads: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
        ("/v1/studies", {}, as_uploader, "study.list"),
        (f"/v1/studies/{study_id}", {}, as_uploader, "study.read"),
        (
            f"/v1/studies/{study_id}/instances/{instance_id}/preview",
            {},
            as_uploader,
            "preview.read",
        ),
        *[
            (f"/v1/studies/{study_id}/report", {"format": f}, as_uploader, "report.read")
            for f in REPORT_FORMATS
        ],
        ("/v1/review/queue", {}, as_reviewer, "review.list"),
        ("/v1/review/queue/view", {}, as_reviewer, "review.list"),
        (f"/v1/review/cases/{case_id}", {}, as_reviewer, "review.read"),
        (f"/v1/review/cases/{case_id}/view", {}, as_reviewer, "review.read"),
    ]
    ids = {}
    for path, params, headers, action in reads:
        request_id = uuid.uuid4().hex
        r = c.get(path, params=params, headers={**headers, "X-Request-ID": request_id})
        assert r.status_code == 200, (path, params, r.status_code)
        ids[request_id] = (path, params, action)

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT request_id, action, principal, outcome FROM audit_log"
            " WHERE request_id = ANY(%s)",
            (list(ids),),
        ).fetchall()
    audited = {r[0] for r in rows}
    missing = [ids[i] for i in ids if i not in audited]
    print(
        f"\naudit: {len(reads)} patient-data reads, {len(rows)} audit rows, {len(missing)} unaudited"
    )
    assert missing == []
    for request_id, action, principal, outcome in rows:
        assert action == ids[request_id][2], (ids[request_id], action)
        assert principal.startswith("test-") and outcome == "ok"
