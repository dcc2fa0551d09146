"""Legal hold over the real stack: an admin puts a processed study on hold through the API
with a reason, it is listed, audited with the reason and survives a purge that its
tenant's policies would otherwise run; the CLI lists and releases it (audited), and the next
purge removes it. Other roles get 403, another tenant's admin 404, a blank reason 4xx."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from orchestrator.privacy.retention import KINDS, set_policy

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
TENANT = "tenant-hold"
REASON = "matter 2026-117: kept for the court"


def _upload(client: httpx.Client) -> str:
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    buf = io.BytesIO()
    ds.save_as(buf)
    r = client.post(
        "/v1/studies", files=[("files", ("h.dcm", buf.getvalue(), "application/dicom"))]
    )
    assert r.status_code == 202, r.text
    study_id = str(r.json()["id"])
    deadline = time.monotonic() + WAIT_S
    while client.get(f"/v1/studies/{study_id}").json()["status"] not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    return study_id


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_legal_hold_over_api_and_cli(
    stack: Any, make_key: Any, database_url: str, settings_env: dict[str, str]
) -> None:
    uploader, admin = make_key("uploader", TENANT), make_key("admin", TENANT)
    stranger = make_key("admin", "tenant-hold-other")
    auth = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
    with httpx.Client(base_url=stack.api_url, timeout=60) as c:
        c.headers.update(auth(uploader))
        study = _upload(c)
        hold_url = f"/v1/studies/{study}/legal-hold"
        # Only admins; only their own tenant's studies; never without a reason.
        assert c.post(hold_url, json={"reason": REASON}).status_code == 403
        assert c.post(hold_url, json={"reason": REASON}, headers=auth(stranger)).status_code == 404
        for blank in ("", "   "):
            r = c.post(hold_url, json={"reason": blank}, headers=auth(admin))
            assert r.status_code in (400, 422), r.text
        r = c.post(hold_url, json={"reason": REASON}, headers=auth(admin))
        assert r.status_code == 200, r.text
        held = r.json()
        assert held["legal_hold"] is True and held["reason"] == REASON and held["held_at"]
        listed = c.get("/v1/legal-holds", headers=auth(admin)).json()
        assert [i["study_id"] for i in listed["items"]] == [study] and listed["total"] == 1
        assert c.get("/v1/legal-holds", headers=auth(stranger)).json()["total"] == 0

    env = {**os.environ, **settings_env}
    with psycopg.connect(database_url) as conn:
        for kind in KINDS:
            set_policy(conn, TENANT, kind, timedelta(seconds=1))
    time.sleep(1.5)
    done = _cli(env, "purge")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT legal_hold FROM studies WHERE id = %s", (study,)
        ).fetchone() == (True,)

    listed_cli = _cli(env, "legal-hold", "list", "--tenant", TENANT)
    assert listed_cli.returncode == 0, listed_cli.stderr
    assert [json.loads(line)["study_id"] for line in listed_cli.stdout.splitlines()] == [study]
    assert _cli(env, "legal-hold", "release", study, "--by", "ops").returncode != 0  # no reason
    released = _cli(env, "legal-hold", "release", study, "--reason", "matter closed", "--by", "ops")
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout)["legal_hold"] is False
    assert _cli(env, "legal-hold", "list", "--tenant", TENANT).stdout == ""
    assert _cli(env, "purge").returncode == 0
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT 1 FROM studies WHERE id = %s", (study,)).fetchone() is None
        trail = conn.execute(
            "SELECT action, principal, outcome, detail->>'reason' FROM audit_log"
            " WHERE resource_id = %s AND action LIKE 'study.legal_hold%%' ORDER BY seq",
            (study,),
        ).fetchall()
    assert [(a, o, r) for a, _, o, r in trail] == [
        ("study.legal_hold", "not_found", REASON),  # the other tenant's admin
        ("study.legal_hold", "ok", REASON),
        ("study.legal_hold_release", "ok", "matter closed"),
    ]
    assert trail[-1][1] == "cli:ops"
