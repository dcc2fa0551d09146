"""`helm test`: post one synthetic chest radiograph through POST /v1/studies and wait until
the study ends with a report (JSON). Exits 0 only then; prints what went wrong otherwise.

Runs in the medtriage image (httpx, numpy and orchestrator.samples are there). Environment:
API_URL, API_KEY (an uploader key), TIMEOUT_S.
"""

from __future__ import annotations

import os
import sys
import time

import httpx
import numpy as np
from pydicom.uid import generate_uid

from orchestrator.samples import radiograph

TERMINAL = {"done", "needs_review", "not_applicable", "failed"}
POLL_S = 2.0


def main() -> int:
    api, timeout_s = os.environ["API_URL"], float(os.environ.get("TIMEOUT_S", "300"))
    headers = {"Authorization": f"Bearer {os.environ['API_KEY']}"}
    # A smooth synthetic film (28x28 like the demo's samples): enough to run the whole path.
    yy, xx = np.mgrid[0:28, 0:28]
    image = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    data = radiograph(image, study_uid=generate_uid(), instance_number=1)
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        posted = client.post("/v1/studies", files=[("files", ("t.dcm", data, "application/dicom"))])
        if posted.status_code != 202:
            print(f"upload: HTTP {posted.status_code}: {posted.text[:500]}")
            return 1
        study_id = posted.json()["studies"][0]["id"]
        deadline = time.monotonic() + timeout_s
        status = ""
        while time.monotonic() < deadline:
            status = client.get(f"/v1/studies/{study_id}").json()["status"]
            if status in TERMINAL:
                break
            time.sleep(POLL_S)
        if status not in TERMINAL or status == "failed":
            print(f"study {study_id}: {status or 'no status'} after {timeout_s:.0f}s")
            return 1
        report = client.get(f"/v1/studies/{study_id}/report")
        if report.status_code != 200 or not isinstance(report.json(), dict):
            print(f"report: HTTP {report.status_code}: {report.text[:300]}")
            return 1
    print(f"study {study_id}: {status}, report served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
