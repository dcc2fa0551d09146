"""``medtriage import`` as a real process over the real stack: a generated folder tree with a
zip and bad files, imported in two runs (the second resumes: what is stored is skipped), a
summary with reasons, and the imported studies processed by the worker."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from redis import Redis
from rq import Queue

from orchestrator.samples import load_samples, radiograph

pytestmark = pytest.mark.integration

SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)
TENANT = "tenant-import"
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
CLI_TIMEOUT_S = 120


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "import", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def _counts(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"imported (\d+), duplicate (\d+) \(already stored\), rejected (\d+)", stdout)
    assert m, stdout
    return int(m[1]), int(m[2]), int(m[3])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("import") / "archive"
    images, _ = load_samples()
    study1, study2 = generate_uid(), generate_uid()
    s1a, s1b, s2 = generate_uid(), generate_uid(), generate_uid()

    def instance(i: int, study: str, series: str) -> bytes:
        return radiograph(images[i], study_uid=study, series_uid=series, size=SIZE)

    first = root / "patientA" / "study1" / "series1"
    first.mkdir(parents=True)
    for i in range(3):
        (first / f"IM{i:04d}").write_bytes(instance(i, study1, s1a))
    second = root / "patientA" / "study1" / "series2"
    second.mkdir(parents=True)
    (second / "IM0000.dcm").write_bytes(instance(3, study1, s1b))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("EXPORT/IM1", instance(4, study2, s2))
        zf.writestr("EXPORT/IM2", instance(5, study2, s2))
        zf.writestr("EXPORT/readme.txt", b"exported by a PACS")
    (root / "patientB").mkdir()
    (root / "patientB" / "export.zip").write_bytes(buf.getvalue())
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_bytes(b"not DICOM")
    good = instance(6, generate_uid(), generate_uid())
    (bad / "truncated.dcm").write_bytes(good[:400])
    ds = dcmread(io.BytesIO(good))
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(bad / "nopixels.dcm", enforce_file_format=True)
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return {"root": root, "first": first, "studies": (study1, study2)}


def test_import_resumes_and_summarises(
    stack: Any, settings_env: dict[str, str], tree: dict[str, Any], database_url: str, make_key: Any
) -> None:
    # An earlier run that stopped after the first series.
    partial = _cli(settings_env, str(tree["first"]), "--tenant", TENANT)
    assert partial.returncode == 0, partial.stderr
    assert _counts(partial.stdout) == (3, 0, 0)

    full = _cli(settings_env, str(tree["root"]), "--tenant", TENANT)
    assert full.returncode == 1, full.stderr[-3000:]  # some files were rejected
    assert _counts(full.stdout) == (3, 3, 4), full.stderr[-3000:]
    assert "[10/10]" in full.stderr  # progress, .DS_Store skipped
    rejected = dict(re.findall(r"^  rejected (\S+): (.+)$", full.stdout, re.M))
    assert set(rejected) == {
        "bad/notes.txt",
        "bad/truncated.dcm",
        "bad/nopixels.dcm",
        "patientB/export.zip/EXPORT/readme.txt",
    }
    assert "DICOM" in rejected["bad/notes.txt"]
    assert "pixel" in rejected["bad/nopixels.dcm"].lower()

    again = _cli(settings_env, str(tree["root"]), "--tenant", TENANT, "--quiet")
    assert _counts(again.stdout) == (0, 6, 4)
    assert again.stderr == ""

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT s.id, s.study_uid, count(i.id) FROM studies s"
            " JOIN tenants t ON t.id = s.tenant_id JOIN instances i ON i.study_id = s.id"
            " WHERE t.name = %s GROUP BY s.id",
            (TENANT,),
        ).fetchall()
        audits = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'study.import'"
        ).fetchone()
    counts = {uid: n for _, uid, n in rows}
    study1, study2 = tree["studies"]
    assert counts == {study1: 4, study2: 2}
    assert audits is not None and audits[0] >= 3

    key = make_key("reviewer", tenant=TENANT)
    deadline = time.monotonic() + WAIT_S
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as c:
        for study_id, _, _ in rows:
            while True:
                status = c.get(f"/v1/studies/{study_id}").json()["status"]
                if status in TERMINAL or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert status in {"done", "needs_review"}, status


def test_import_of_a_missing_path_is_a_clear_error(settings_env: dict[str, str]) -> None:
    result = _cli(settings_env, "/no/such/folder")
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr


def test_large_zip_member_is_inflated_to_disk_and_imported(
    stack: Any, settings_env: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    frames = 10  # 1024 x 1024 x 10 x 2 bytes = 20 MiB, over the 16 MiB in-memory limit
    images, _ = load_samples()
    ds = dcmread(io.BytesIO(radiograph(images[7], study_uid=generate_uid(), size=SIZE)))
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(range(256)) * (1024 * 1024 * frames * 2 // 256)
    raw = io.BytesIO()
    ds.save_as(raw, enforce_file_format=True)
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("EXPORT/IM1", raw.getvalue())
    result = _cli(settings_env, str(archive), "--tenant", TENANT, "--quiet")
    assert _counts(result.stdout) == (1, 0, 0), result.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT frames, size_bytes FROM instances WHERE sop_uid = %s", (ds.SOPInstanceUID,)
        ).fetchone()
    assert row == (frames, len(raw.getvalue()))
    # Re-run: recognised from the inflated member's header, skipped.
    again = _cli(settings_env, str(archive), "--tenant", TENANT, "--quiet")
    assert _counts(again.stdout) == (0, 1, 0)


# Studies in one import run (#24: every upload is audited per study, whatever its size).
MANY_STUDIES = 120
TINY = 16


def test_an_import_of_many_studies_is_audited_per_study(
    database_url: str, redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    images, _ = load_samples()
    study_uids = [generate_uid() for _ in range(MANY_STUDIES)]
    for i, uid in enumerate(study_uids):
        path = tmp_path / "many" / f"S{i:04d}" / "IM1"
        path.parent.mkdir(parents=True)
        path.write_bytes(radiograph(images[i % len(images)], study_uid=uid, size=TINY))
    prefix = f"import-many-{uuid.uuid4().hex[:8]}"  # a queue no worker reads: no Triton needed
    env = {
        "MEDTRIAGE_DATABASE_URL": database_url,
        "MEDTRIAGE_REDIS_URL": redis_url,
        "MEDTRIAGE_QUEUE_PREFIX": prefix,
        "MEDTRIAGE_STORAGE_URL": f"file://{storage_dir}",
    }
    tenant = f"tenant-import-many-{prefix}"
    try:
        first = _cli(env, str(tmp_path / "many"), "--tenant", tenant, "--quiet")
        again = _cli(env, str(tmp_path / "many"), "--tenant", tenant, "--quiet")
    finally:
        Queue(f"{prefix}:studies", connection=Redis.from_url(redis_url)).delete(delete_jobs=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _counts(first.stdout) == (MANY_STUDIES, 0, 0)
    assert _counts(again.stdout) == (0, MANY_STUDIES, 0)
    assert first.stderr == again.stderr == ""
    with psycopg.connect(database_url) as conn:
        ids = dict(
            conn.execute(
                "SELECT study_uid, id::text FROM studies WHERE study_uid = ANY(%s)", (study_uids,)
            ).fetchall()
        )
        rows = conn.execute(
            "SELECT resource_id, outcome, request_id, detail FROM audit_log"
            " WHERE action = 'study.import' AND resource_id = ANY(%s) ORDER BY seq",
            (list(ids.values()),),
        ).fetchall()
    assert len(ids) == MANY_STUDIES
    runs = [rows[:MANY_STUDIES], rows[MANY_STUDIES:]]
    for run, instances in zip(runs, ({"accepted": 1}, {"duplicate": 1}), strict=True):
        assert sorted(r[0] for r in run) == sorted(ids.values())
        assert {r[1] for r in run} == {"ok"}
        assert len({r[2] for r in run}) == 1  # one run
        assert all(r[3]["instances"] == instances for r in run)
        assert all(r[3]["studies"] == MANY_STUDIES for r in run)
