"""The review loop over the real stack: gate reason codes from the real pipeline, queue order,
claims, verdicts, release, refusals that change nothing, and ground-truth figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from orchestrator.samples import load_samples

pytestmark = pytest.mark.integration

TENANT = "tenant-review"
LABELS = ("normal", "pneumonia")


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def world(stack: Any, make_key: Any, database_url: str, review_study: Any) -> dict[str, Any]:
    """Three lossy studies of one tenant (routine, STAT, routine) and two reviewers."""
    images, _ = load_samples()
    uploader = make_key("uploader", tenant=TENANT)
    client = httpx.Client(base_url=stack.api_url, timeout=60)
    studies = {
        "a": review_study(client, uploader, images[0]),
        "b": review_study(client, uploader, images[1], priority="stat"),
        "c": review_study(client, uploader, images[2]),
    }
    with psycopg.connect(database_url) as conn:
        cases = {
            name: str(
                conn.execute("SELECT id FROM review_cases WHERE study_id = %s", (sid,)).fetchone()[
                    0
                ]
            )
            for name, sid in studies.items()
        }
    return {
        "client": client,
        "uploader": uploader,
        "r1": make_key("reviewer", tenant=TENANT),
        "r2": make_key("reviewer", tenant=TENANT),
        "studies": studies,
        "cases": cases,
        "db": database_url,
    }


def _row(world: dict[str, Any], case: str) -> tuple[Any, ...]:
    with psycopg.connect(world["db"]) as conn:
        row = conn.execute(
            "SELECT status, claimed_by_name, verdict, correct_label, note, closed_at"
            " FROM review_cases WHERE id = %s",
            (world["cases"][case],),
        ).fetchone()
    assert row is not None
    return tuple(row)


def _post(world: dict[str, Any], who: str, case: str, action: str, **body: Any) -> httpx.Response:
    return world["client"].post(
        f"/v1/review/cases/{world['cases'][case]}/{action}",
        json=body or None,
        headers=_headers(world[who]),
    )


def test_reason_codes_and_queue_order(world: dict[str, Any]) -> None:
    c = world["client"]
    r = c.get("/v1/review/queue", headers=_headers(world["r1"]))
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    ours = {v: k for k, v in world["cases"].items()}
    assert {ours[i["id"]] for i in items if i["id"] in ours} == {"a", "b", "c"}
    by_name = {ours[i["id"]]: i for i in items if i["id"] in ours}
    for name, item in by_name.items():
        assert "lossy_source" in item["reasons"], item
        assert item["details"]["lossy_source"][0]["warning"] == "lossy_source"
        critical = "critical_finding" in item["reasons"]
        assert item["urgency"] == 2 * critical + (name == "b"), item
        assert item["priority"] == ("stat" if name == "b" else "routine")
    # Urgency first, then age (the oldest case first among equals).
    keys = [(-i["urgency"], i["created_at"]) for i in items]
    assert keys == sorted(keys)
    if by_name["a"]["urgency"] == by_name["b"]["urgency"] - 1:  # neither a nor b critical
        assert items.index(by_name["b"]) < items.index(by_name["a"])
    assert items.index(by_name["a"]) < items.index(by_name["c"]) or (
        by_name["c"]["urgency"] > by_name["a"]["urgency"]
    )
    # Only reviewers (and admins) see the queue.
    assert c.get("/v1/review/queue", headers=_headers(world["uploader"])).status_code == 403


def test_claim_conflicts_release_and_bad_verdicts(world: dict[str, Any]) -> None:
    r = _post(world, "r1", "a", "claim")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "claimed" and r.json()["claimed_by_name"] == "test-reviewer"
    before = _row(world, "a")
    # A second reviewer cannot claim it, nor give a verdict, nor release it.
    r = _post(world, "r2", "a", "claim")
    assert r.status_code == 409 and "another reviewer" in r.json()["detail"]
    r = _post(world, "r2", "a", "verdict", verdict="agree")
    assert r.status_code == 409, r.text
    assert _post(world, "r2", "a", "release").status_code == 409
    # The holder's bad input: an unknown label, a label on 'agree', an unknown verdict.
    r = _post(world, "r1", "a", "verdict", verdict="override", correct_label="fracture")
    assert r.status_code == 422 and "fracture" in r.json()["detail"]
    r = _post(world, "r1", "a", "verdict", verdict="agree", correct_label="normal")
    assert r.status_code == 422, r.text
    r = _post(world, "r1", "a", "verdict", verdict="maybe")
    assert r.status_code == 422, r.text
    # A verdict on a case nobody claimed.
    r = _post(world, "r1", "b", "verdict", verdict="agree")
    assert r.status_code == 409 and "claim it first" in r.json()["detail"]
    assert _row(world, "a") == before
    assert _row(world, "b")[0] == "open"
    # Release, then the other reviewer may claim.
    r = _post(world, "r1", "a", "release")
    assert r.status_code == 200 and r.json()["status"] == "open"
    assert _row(world, "a")[:2] == ("open", None)
    assert _post(world, "r2", "a", "claim").status_code == 200


def test_two_reviewers_racing_for_one_case(world: dict[str, Any]) -> None:
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def claim(who: str) -> None:
        with httpx.Client(base_url=world["client"].base_url, timeout=30) as c:
            barrier.wait()
            statuses.append(
                c.post(
                    f"/v1/review/cases/{world['cases']['c']}/claim", headers=_headers(world[who])
                ).status_code
            )

    threads = [threading.Thread(target=claim, args=(w,)) for w in ("r1", "r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 409]
    status, holder, *_ = _row(world, "c")
    assert status == "claimed" and holder == "test-reviewer"
    # Whoever won releases it again for the next test.
    for who in ("r1", "r2"):
        if _post(world, who, "c", "release").status_code == 200:
            break
    assert _row(world, "c")[0] == "open"


def test_a_failed_report_write_changes_nothing(
    world: dict[str, Any], storage_dir: Path, database_url: str
) -> None:
    """The verdict and its report revision commit together: when the object store refuses
    the new revision, the case stays claimed and no report row appears."""
    with psycopg.connect(database_url) as conn:
        tenant_id, key = conn.execute(
            "SELECT s.tenant_id, r.object_key FROM studies s JOIN reports r ON r.study_id = s.id"
            " WHERE s.id = %s AND r.revision = 1 AND r.format = 'json'",
            (world["studies"]["a"],),
        ).fetchone()
    reports_dir = (storage_dir / key).parent
    aside = reports_dir.with_name("reports-aside")
    before = _row(world, "a")
    assert before[0] == "claimed"
    reports_dir.rename(aside)
    reports_dir.write_bytes(b"not a directory")  # even root cannot put a file under it
    try:
        r = _post(world, "r2", "a", "verdict", verdict="agree")
        assert r.status_code == 503 and "object store" in r.json()["detail"], r.text
    finally:
        reports_dir.unlink()
        aside.rename(reports_dir)
    assert _row(world, "a") == before
    with psycopg.connect(database_url) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM reports WHERE study_id = %s", (world["studies"]["a"],)
        ).fetchone()
    assert n == 1


def _labels(
    world: dict[str, Any], study: str, *, live_only: bool = True
) -> dict[tuple[str, int], list[str]]:
    arms = ["live"] if live_only else ["live", "shadow"]
    with psycopg.connect(world["db"]) as conn:
        rows = conn.execute(
            "SELECT model, version, label FROM results WHERE study_id = %s AND arm = ANY(%s)",
            (world["studies"][study], arms),
        ).fetchall()
    out: dict[tuple[str, int], list[str]] = {}
    for model, version, label in rows:
        out.setdefault((model, int(version)), []).append(label)
    return out


def test_verdicts_close_cases_regenerate_reports_and_score_models(
    world: dict[str, Any],
) -> None:
    c = world["client"]
    # Case a is held by r2 (previous test): agree.
    r = _post(world, "r2", "a", "verdict", verdict="agree", note="looks right")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "closed" and r.json()["report_revision"] == 2
    assert _row(world, "a")[:5] == ("closed", "test-reviewer", "agree", None, "looks right")
    # A second verdict on the closed case is refused and changes nothing.
    closed = _row(world, "a")
    r = _post(world, "r2", "a", "verdict", verdict="override", correct_label="pneumonia")
    assert r.status_code == 409 and "already closed" in r.json()["detail"]
    assert _post(world, "r1", "a", "claim").status_code == 409
    assert _row(world, "a") == closed

    # Case c: override with the label the live triage model did not give.
    triage_c = _labels(world, "c")
    (live_c,) = {label for (m, _), labels in triage_c.items() if m == "triage" for label in labels}
    truth_c = next(lab for lab in LABELS if lab != live_c)
    # Overriding with the model's own label is refused: that is an 'agree'.
    assert _post(world, "r1", "c", "claim").status_code == 200
    r = _post(world, "r1", "c", "verdict", verdict="override", correct_label=live_c)
    assert r.status_code == 422 and "agree" in r.json()["detail"]
    r = _post(world, "r1", "c", "verdict", verdict="override", correct_label=truth_c)
    assert r.status_code == 200, r.text
    assert _row(world, "c")[2:4] == ("override", truth_c)

    # Each verdict made a new report revision; the old one is kept.
    key = _headers(world["uploader"])
    study_c = c.get(f"/v1/studies/{world['studies']['c']}", headers=key).json()
    assert study_c["status"] == "done"
    revisions = sorted(r["revision"] for r in study_c["reports"] if r["format"] == "json")
    assert revisions == [1, 2]
    report = c.get(f"/v1/studies/{world['studies']['c']}/report", headers=key).json()
    assert report["review"]["verdict"] == "override"
    assert report["review"]["correct_label"] == truth_c

    # Figures per version (live and shadow arms), recomputed here from the stored rows.
    truth = {"a": None, "c": truth_c}  # None: agree = the live triage label
    expected: dict[int, list[tuple[str, str]]] = {}
    for study, t in truth.items():
        (triage_label,) = {
            x for (m, _), ls in _labels(world, study).items() if m == "triage" for x in ls
        }
        for (model, version), predicted in _labels(world, study, live_only=False).items():
            if model == "triage":
                expected.setdefault(version, []).extend((p, t or triage_label) for p in predicted)
    r = c.get("/v1/review/stats", params={"model": "triage"}, headers=_headers(world["r1"]))
    assert r.status_code == 200, r.text
    got = {v["version"]: v for v in r.json()["versions"]}
    assert set(got) == set(expected)
    for version, pairs in expected.items():
        n = len(pairs)
        correct = sum(p == a for p, a in pairs)
        pos = [p for p, a in pairs if a == "pneumonia"]
        neg = [p for p, a in pairs if a == "normal"]
        assert got[version]["reviewed"] == n
        assert got[version]["accuracy"] == pytest.approx(correct / n, abs=1e-4)
        sens = sum(p == "pneumonia" for p in pos) / len(pos) if pos else None
        spec = sum(p == "normal" for p in neg) / len(neg) if neg else None
        assert got[version]["sensitivity"] == (pytest.approx(sens, abs=1e-4) if pos else None)
        assert got[version]["specificity"] == (pytest.approx(spec, abs=1e-4) if neg else None)
    # One of the two reviewed studies was overridden: the live version is not perfect.
    assert any(v["accuracy"] < 1.0 for v in got.values())


def test_models_compare_shows_the_reviewed_figures(
    world: dict[str, Any], make_key: Any, settings_env: dict[str, str]
) -> None:
    """After the verdicts above: the same figures (every tenant's cases) in the ML engineer's
    compare view, over HTTP and in `medtriage models compare`."""
    from orchestrator.triage import review

    with psycopg.connect(world["db"]) as conn:
        expected = review.figures_by_version(conn, "triage")
    assert expected, "the previous test closed cases of triage"
    version, figures = sorted(expected.items())[0]
    assert figures["accuracy"] is not None
    r = world["client"].get(
        "/v1/models/triage/compare",
        params={"versions": sorted(expected)},
        headers=_headers(make_key("ml-engineer", tenant=TENANT)),
    )
    assert r.status_code == 200, r.text
    got = {v["version"]: v for v in r.json()["versions"]}
    for v, f in expected.items():
        assert {k: got[v][k] for k in review.FIGURES} == f
    # ... and as a gauge (refreshed on each verdict and stats read).
    from prometheus_client.parser import text_string_to_metric_families

    text = world["client"].get("/metrics").text
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "medtriage_model_reviewed_performance"
    ]
    gauges = {
        (s.labels["model"], int(s.labels["version"]), s.labels["figure"]): s.value
        for s in family.samples
    }
    for v, f in expected.items():
        for figure, value in f.items():
            if value is not None:
                assert gauges[("triage", v, figure)] == pytest.approx(value)
    cli = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "models", "compare", "triage", str(version)],
        env={**os.environ, **settings_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    header, _, row = cli.stdout.splitlines()[:3]
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert float(cells["accuracy"]) == pytest.approx(figures["accuracy"])


def test_gate_thresholds_over_the_api_and_the_cli(
    world: dict[str, Any], make_key: Any, settings_env: dict[str, str]
) -> None:
    """Set per-version thresholds (to the defaults' values, so other tests' studies gate as
    before), refuse bad ones, and read them back over HTTP and from the CLI."""
    c = world["client"]
    ml = _headers(make_key("platform-ml-engineer", tenant="platform"))
    values = {"min_confidence": 0.75, "max_entropy": 0.6, "critical_probability": 0.9}
    r = c.put("/v1/models/triage/thresholds", json={"version": 2, **values}, headers=ml)
    assert r.status_code == 200, r.text
    (row,) = [t for t in r.json()["thresholds"] if t["version"] == 2]
    assert {k: row[k] for k in values} == values and row[
        "updated_by"
    ] == "test-platform-ml-engineer"
    bad = {**values, "min_confidence": 1.5}
    assert c.put("/v1/models/triage/thresholds", json=bad, headers=ml).status_code == 422
    unknown = c.put("/v1/models/nope/thresholds", json=values, headers=ml)
    assert unknown.status_code == 404
    no_version = c.put("/v1/models/triage/thresholds", json={"version": 7, **values}, headers=ml)
    assert no_version.status_code == 404
    reviewer = _headers(world["r1"])
    assert c.put("/v1/models/triage/thresholds", json=values, headers=reviewer).status_code == 403
    tenant_ml = _headers(make_key("ml-engineer", tenant=TENANT))
    assert c.put("/v1/models/triage/thresholds", json=values, headers=tenant_ml).status_code == 403

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "models", "thresholds", "triage", *args],
            env={**os.environ, **settings_env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("--version", "1", "--min-confidence", "0.75", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout)
    assert [(r["version"], r["min_confidence"], r["confidence_source"]) for r in rows] == [
        (1, 0.75, "gate_thresholds (version 1)"),
        (2, 0.75, "gate_thresholds (version 2)"),
    ]
    # Every version states its operating point and OOD threshold and where they came from.
    for r in rows:
        assert r["positive_labels"] == "pneumonia" and r["target_sensitivity"] == 0.97, r
        assert r["operating_threshold"] is not None and "gate.json" in r["operating_source"], r
        assert r["ood_threshold"] is not None and "gate.json" in r["ood_source"], r
    refused = cli("--version", "1", "--min-confidence", "2")
    assert refused.returncode == 2 and "min_confidence must be in [0, 1]" in refused.stdout
    with psycopg.connect(world["db"]) as conn:
        conn.execute("DELETE FROM gate_thresholds WHERE model = 'triage'")
