"""What the running stack tells a clinician, measured: the chest test split as DICOM films
through API → worker → Triton reproduces the model card's pipeline-path figures, and images no
model was made for never come back auto-accepted.

The card (``model_repository/triage/<live version>/card.json``, ``test_paths["512"]``) was
measured by training/ with ONNX Runtime on the same films put through ``preprocess/``; the stack
must give the same answer through its own ingest, decode sandbox, routing and Triton.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import psycopg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from orchestrator.samples import radiograph
from orchestrator.settings import REPO_ROOT
from training import metrics

pytestmark = pytest.mark.integration

TEST_FILE = REPO_ROOT.parent / "shared" / "data" / "medmnist" / "pneumoniamnist_varun19424.npz"
SHARED_DICOM = REPO_ROOT.parent / "shared" / "data" / "dicom"
FILM_SIZE = 512
# Triton's python backend and the card's ONNX Runtime run the same graph on the same tensors;
# the figures may differ only by ties broken in the last float bit.
FIGURE_TOLERANCE = 0.005
WAIT_S = 600.0
UPLOAD_THREADS = 4
TERMINAL = ("done", "failed", "needs_review", "not_applicable")


def _post(client: httpx.Client, name: str, data: bytes) -> str:
    r = client.post("/v1/studies", files=[("files", (name, data, "application/dicom"))])
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait_all(database_url: str, ids: list[str]) -> dict[str, str]:
    deadline = time.monotonic() + WAIT_S
    while True:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT id::text, status FROM studies WHERE id = ANY(%s::uuid[])", (ids,)
            ).fetchall()
        status = dict(rows)
        if all(status.get(i) in TERMINAL for i in ids):
            return status
        if time.monotonic() > deadline:
            waiting = sum(status.get(i) not in TERMINAL for i in ids)
            raise AssertionError(f"{waiting} of {len(ids)} studies unfinished after {WAIT_S}s")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def client(stack: Any, make_key: Any) -> httpx.Client:
    key = make_key("uploader", tenant="accuracy")
    return httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def test_chest_test_split_through_the_stack_matches_the_card(
    client: httpx.Client, database_url: str
) -> None:
    data = np.load(TEST_FILE)
    images, labels = data["test_images"], data["test_labels"].reshape(-1)
    films = [
        radiograph(img, study_uid=generate_uid(), size=FILM_SIZE, accession=f"ACC{i}")
        for i, img in enumerate(images)
    ]
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        ids = list(pool.map(lambda f: _post(client, "cr.dcm", f[1]), enumerate(films)))
    status = _wait_all(database_url, ids)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT r.study_id::text, r.version, r.label, r.outputs, r.findings"
            " FROM results r WHERE r.study_id = ANY(%s::uuid[])"
            " AND r.model = 'triage' AND r.arm = 'live'",
            (ids,),
        ).fetchall()
    by_study = {
        sid: (version, label, outputs, found) for sid, version, label, outputs, found in rows
    }
    assert len(by_study) == len(ids), "every chest film has a live triage result"
    versions = {v for v, *_ in by_study.values()}
    assert len(versions) == 1, versions
    (version,) = versions
    card = json.loads(
        (REPO_ROOT / "model_repository" / "triage" / str(version) / "card.json").read_text()
    )
    expected = card["test_paths"][str(FILM_SIZE)]["figures"]
    probs = np.array([by_study[i][2]["probs"] for i in ids], dtype=np.float64)
    assert metrics.accuracy(probs, labels) == pytest.approx(expected["acc"], abs=FIGURE_TOLERANCE)
    assert metrics.auc(probs[:, 1], labels) == pytest.approx(expected["auc"], abs=FIGURE_TOLERANCE)
    # No positive finding is finalised without review: every 'done' study is a negative at the
    # operating point, and the review rate is what the card says.
    positives = {i for i in ids if by_study[i][1] == "pneumonia"}
    assert not [i for i in positives if status[i] == "done"]
    assert {status[i] for i in ids} <= {"done", "needs_review"}
    truth = dict(zip(ids, labels, strict=True))
    sensitivity = sum(truth[i] == 1 for i in positives) / max(1, int(labels.sum()))
    specificity = sum(truth[i] == 0 for i in set(ids) - positives) / max(
        1, int((labels == 0).sum())
    )
    assert sensitivity == pytest.approx(expected["op_sensitivity"], abs=FIGURE_TOLERANCE)
    assert specificity == pytest.approx(expected["op_specificity"], abs=FIGURE_TOLERANCE)


def _as_chest_film(pixels_u8: np.ndarray) -> bytes:
    """Any 8-bit picture dressed as a paediatric chest CR film (all header rules met)."""
    return radiograph(pixels_u8, study_uid=generate_uid(), size=FILM_SIZE)


def _other_images() -> dict[str, bytes]:
    chest = np.load(TEST_FILE)["test_images"]
    breast = np.load(REPO_ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz")
    retina = np.load(REPO_ROOT.parent / "shared" / "data" / "medmnist" / "retinamnist.npz")
    out: dict[str, bytes] = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        out[name] = Path(str(get_testdata_file(name))).read_bytes()
    for rel in ("dicom-test-files/WG04/RLE/US1_RLE", "dicom-test-files/WG04/RLE/CT1_RLE"):
        out[rel.rsplit("/", 1)[-1]] = (SHARED_DICOM / rel).read_bytes()
    out["seg-label"] = (
        SHARED_DICOM / "dicom-test-files/dcmqi/segmentations/23x38x3/seg/label.seg"
    ).read_bytes()
    # Pictures that pass the chest rules by their headers: the OOD detector must stop them.
    out["blank-grey-film"] = _as_chest_film(np.full((28, 28), 128, np.uint8))
    out["blank-black-film"] = _as_chest_film(np.zeros((28, 28), np.uint8))
    for i in range(4):
        out[f"inverted-chest-{i}"] = _as_chest_film(255 - chest[i])
        out[f"rotated-chest-{i}"] = _as_chest_film(np.ascontiguousarray(np.rot90(chest[i])))
        out[f"breast-us-as-cr-{i}"] = _as_chest_film(breast["test_images"][i])
        grey = cv2.cvtColor(retina["test_images"][i], cv2.COLOR_RGB2GRAY)
        out[f"fundus-as-cr-{i}"] = _as_chest_film(grey)
    return out


def test_images_no_model_was_made_for_are_never_auto_accepted(
    client: httpx.Client, database_url: str
) -> None:
    files = _other_images()
    ids = {name: _post(client, name, data) for name, data in files.items()}
    status = _wait_all(database_url, list(ids.values()))
    with psycopg.connect(database_url) as conn:
        reasons = dict(
            conn.execute(
                "SELECT study_id::text, reasons FROM review_cases WHERE study_id = ANY(%s::uuid[])",
                (list(ids.values()),),
            ).fetchall()
        )
    flagged = {n for n, i in ids.items() if "out_of_distribution" in (reasons.get(i) or [])}
    verdict = {n: status[i] for n, i in ids.items()}
    assert not [n for n, s in verdict.items() if s == "done"], verdict
    for name in ("CT_small.dcm", "MR_small.dcm", "US1_RLE", "CT1_RLE", "seg-label"):
        assert verdict[name] in ("not_applicable", "failed"), (name, verdict[name])
    dressed = [n for n in files if "-film" in n or "-chest-" in n or "-as-cr-" in n]
    # Every picture dressed as a chest film reaches review; the share the OOD gate catches is
    # the card's claim (≥ 95 %), checked here on this fixed set.
    assert all(verdict[n] == "needs_review" for n in dressed), verdict
    share = len(flagged & set(dressed)) / len(dressed)
    assert share >= 0.95, (share, sorted(set(dressed) - flagged))


def test_a_dressed_film_is_readable_dicom() -> None:
    """The helper above makes what a chest rule accepts (guards the test itself)."""
    ds = dcmread(io.BytesIO(_as_chest_film(np.zeros((28, 28), np.uint8))))
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge) == (
        "CR",
        "CHEST",
        "AP",
        "003Y",
    )
