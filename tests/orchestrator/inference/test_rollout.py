"""Rollout against the real stack: two versions side by side in the real Triton, a sticky
50/50 split, shadows recorded but never returned, a version unloaded mid-run with no study
lost, and a promotion refused by its gate."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from pydicom.uid import generate_uid

from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
SPLIT_STUDIES = 200
# Binomial σ for 200 studies at p=0.5 is 3.5 %; ±12 % is beyond 3σ.
SPLIT_TOLERANCE = 0.12
# Small images keep 200 studies quick; the model input is 28×28 either way.
IMAGE_SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)
WAIT_S = 240.0


@pytest.fixture(scope="module")
def clients(stack: Any, make_key: Any) -> tuple[httpx.Client, httpx.Client]:
    up = httpx.Client(
        base_url=stack.api_url,
        timeout=60,
        headers={"Authorization": f"Bearer {make_key('uploader', 'rollout')}"},
    )
    ml = httpx.Client(
        base_url=stack.api_url,
        timeout=60,
        headers={"Authorization": f"Bearer {make_key('platform-ml-engineer', 'platform')}"},
    )
    return up, ml


def _post(up: httpx.Client, image: np.ndarray, study_uid: str | None = None) -> str:
    data = radiograph(image, study_uid=study_uid or generate_uid(), size=IMAGE_SIZE)
    response = up.post("/v1/studies", files=[("files", ("x.dcm", data, "application/dicom"))])
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _wait_all(up: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(ids):
        for study_id in ids:
            if study_id not in done:
                body = up.get(f"/v1/studies/{study_id}").json()
                if body["status"] in TERMINAL:
                    done[study_id] = body
        assert time.monotonic() < deadline, f"{len(ids) - len(done)} studies unfinished"
        time.sleep(0.3)
    return done


def _triage_version(study: dict[str, Any]) -> int:
    versions = {
        r["version"] for i in study["instances"] for r in i["results"] if r["model"] == "triage"
    }
    assert len(versions) == 1, versions
    return versions.pop()


def test_two_versions_loaded_side_by_side(clients: tuple[httpx.Client, httpx.Client]) -> None:
    _, ml = clients
    models = {m["model"]: m for m in ml.get("/v1/models").json()["models"]}
    assert models["triage"]["loaded"][:2] == [1, 2]
    assert models["analysis"]["loaded"][:2] == [1, 2]


def test_bad_weights_are_refused(clients: tuple[httpx.Client, httpx.Client]) -> None:
    _, ml = clients
    r = ml.put("/v1/models/triage/routes", json={"weights": {"1": 60, "2": 30}})
    assert r.status_code == 400 and "sum to 100" in r.json()["detail"]
    r = ml.put("/v1/models/triage/routes", json={"weights": {"1": 50, "9": 50}})
    assert r.status_code == 400 and "no version" in r.json()["detail"]


def test_sticky_fifty_fifty_split(clients: tuple[httpx.Client, httpx.Client]) -> None:
    up, ml = clients
    assert (
        ml.put("/v1/models/triage/routes", json={"weights": {"1": 50, "2": 50}}).status_code == 200
    )
    images, _ = load_samples()
    uids = [generate_uid() for _ in range(SPLIT_STUDIES)]
    ids = [_post(up, images[i % len(images)], uid) for i, uid in enumerate(uids)]
    studies = _wait_all(up, ids)
    versions = Counter(_triage_version(s) for s in studies.values())
    assert set(versions) == {1, 2}
    assert abs(versions[1] / SPLIT_STUDIES - 0.5) < SPLIT_TOLERANCE, versions
    # Sticky: a later instance of the same study meets the same version.
    first = studies[ids[0]]
    again = _post(up, images[1], study_uid=uids[0])
    assert again == ids[0]
    restudied = _wait_all(up, [again])[again]
    assert len(restudied["instances"]) == 2
    assert _triage_version(restudied) == _triage_version(first)


def test_shadow_results_are_stored_but_not_returned(
    clients: tuple[httpx.Client, httpx.Client], database_url: str
) -> None:
    up, ml = clients
    assert ml.put("/v1/models/triage/routes", json={"weights": {"1": 100}}).status_code == 200
    assert ml.post("/v1/models/triage/shadows/2").status_code == 200
    try:
        images, _ = load_samples()
        study_id = _post(up, images[3])
        study = _wait_all(up, [study_id])[study_id]
        returned = [r for i in study["instances"] for r in i["results"]]
        assert {
            (r["model"], r["version"], r["arm"]) for r in returned if r["model"] == "triage"
        } == {("triage", 1, "live")}
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT version, arm FROM results WHERE study_id = %s AND model = 'triage'",
                (study_id,),
            ).fetchall()
        assert sorted(rows) == [(1, "live"), (2, "shadow")]
        compare = ml.get("/v1/models/triage/compare", params={"versions": [1, 2]}).json()
        shadow = next(v for v in compare["versions"] if v["version"] == 2)
        assert shadow["agreement_with_live"] is not None
    finally:
        ml.delete("/v1/models/triage/shadows/2")


def test_unloading_a_version_mid_run_loses_no_study(
    clients: tuple[httpx.Client, httpx.Client], database_url: str
) -> None:
    up, ml = clients
    assert (
        ml.put("/v1/models/triage/routes", json={"weights": {"1": 50, "2": 50}}).status_code == 200
    )
    images, _ = load_samples()
    ids = [_post(up, images[i % len(images)]) for i in range(40)]
    # A routed version is not unloaded (409, test_platform_models.py): route away first.
    assert ml.post("/v1/models/triage/versions/2/unload").status_code == 409
    assert ml.put("/v1/models/triage/routes", json={"weights": {"1": 100}}).status_code == 200
    unloaded = ml.post("/v1/models/triage/versions/2/unload")
    assert unloaded.status_code == 200, unloaded.text
    assert 2 not in unloaded.json()["loaded"]
    try:
        studies = _wait_all(up, ids)
        statuses = Counter(s["status"] for s in studies.values())
        assert statuses["failed"] == 0, statuses
        with psycopg.connect(database_url) as conn:
            routes = conn.execute(
                "SELECT version, weight FROM model_routes WHERE model = 'triage' AND NOT shadow"
            ).fetchall()
        assert routes == [(1, 100)]
    finally:
        assert ml.post("/v1/models/triage/versions/2/load").status_code == 200


def test_promotion_refused_by_failing_gate(
    clients: tuple[httpx.Client, httpx.Client], database_url: str
) -> None:
    _, ml = clients
    assert ml.put("/v1/models/triage/routes", json={"weights": {"1": 100}}).status_code == 200
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO model_gates (model, min_results) VALUES ('triage', 100000)"
            " ON CONFLICT (model) DO UPDATE SET min_results = 100000"
        )
    refused = ml.post("/v1/models/triage/versions/2/promote")
    assert refused.status_code == 409
    assert "refused" in refused.json()["detail"]
    routes = ml.get("/v1/models").json()["models"]
    triage = next(m for m in routes if m["model"] == "triage")
    assert [(r["version"], r["weight"]) for r in triage["routes"] if not r["shadow"]] == [(1, 100)]
    forced = ml.post("/v1/models/triage/versions/2/promote", json={"force": True})
    assert forced.status_code == 200
    assert ml.post("/v1/models/triage/rollback").status_code == 200
    with psycopg.connect(database_url) as conn:
        actions = [
            r[0]
            for r in conn.execute(
                "SELECT action FROM model_events WHERE model = 'triage' ORDER BY id DESC LIMIT 3"
            )
        ]
    assert actions == ["rollback", "promote", "promote_refused"]
