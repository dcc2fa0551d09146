"""The C-STORE receiver as a real process (``medtriage dimse``) over the real stack, fed by
senders no one here wrote: DCMTK's echoscu/storescu and pynetdicom's SCU. Uncompressed and
RLE instances are stored and processed; a re-sent instance is stored once; bad instances get
a DICOM failure status with a comment and leave nothing stored."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from redis import Redis
from rq import Queue

from orchestrator.samples import load_samples, radiograph
from orchestrator.store.db.audit import verify

pytestmark = pytest.mark.integration

AE_TITLE = "MEDTRIAGE"
TENANT = "tenant-dimse"
SIZE = 256  # the chest set takes films of at least 256×256 (applicability.toml)
START_TIMEOUT_S = 30.0
TOOL_TIMEOUT_S = 60
TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0
# The receiver's default stable age (MEDTRIAGE_INGEST_STABLE_AGE_S).
STABLE_AGE_S = 60.0


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: install the Debian package dcmtk (scripts/apt-packages.txt)"
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """``medtriage dimse`` with its output in a file (a pipe nobody drains could fill up)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "dimse", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while "listening" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=START_TIMEOUT_S)


@pytest.fixture(scope="module")
def scp(
    stack: Any, settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    port = _free_port()
    env = {**settings_env, "MEDTRIAGE_DIMSE_AE_TITLE": AE_TITLE, "MEDTRIAGE_DIMSE_TENANT": TENANT}
    proc = _start(env, port, tmp_path_factory.mktemp("dimse") / "scp.log")
    yield port
    _stop(proc)


def _instance(i: int, study_uid: str, series_uid: str) -> bytes:
    images, _ = load_samples()
    return radiograph(images[i], study_uid=study_uid, series_uid=series_uid, size=SIZE)


def _count(database_url: str, study_uid: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_id"
            " JOIN tenants t ON t.id = s.tenant_id WHERE s.study_uid = %s AND t.name = %s",
            (study_uid, TENANT),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_echoscu(scp: int) -> None:
    result = subprocess.run(
        [_dcmtk("echoscu"), "-aec", AE_TITLE, "127.0.0.1", str(scp)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr


def test_storescu_sends_a_study_incl_rle_and_it_is_processed(
    scp: int, tmp_path: Path, database_url: str, make_key: Any, stack: Any
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = tmp_path / "study"
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i}").write_bytes(_instance(i, study_uid, series_uid))
    rle = dcmread(io.BytesIO(_instance(3, study_uid, series_uid)))
    rle.compress(RLELossless)
    rle_file = tmp_path / "rle.dcm"
    rle.save_as(rle_file, enforce_file_format=True)
    responses = ""
    # The folder as stored (uncompressed); the RLE file proposed as RLE (-xr), sent as is.
    for args in (
        ["+sd", "127.0.0.1", str(scp), str(folder)],
        ["-xr", "127.0.0.1", str(scp), str(rle_file)],
    ):
        result = subprocess.run(
            [_dcmtk("storescu"), "-v", "-aec", AE_TITLE, *args],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        responses += result.stderr
    assert responses.count("Received Store Response (Success)") == 4, responses
    sent = time.monotonic()
    assert _count(database_url, study_uid) == 4
    with psycopg.connect(database_url) as conn:
        syntaxes = {
            r[0]
            for r in conn.execute(
                "SELECT transfer_syntax_uid FROM instances i JOIN studies s ON s.id = i.study_id"
                " WHERE s.study_uid = %s",
                (study_uid,),
            )
        }
        row = conn.execute("SELECT id FROM studies WHERE study_uid = %s", (study_uid,)).fetchone()
    assert RLELossless in syntaxes
    assert row is not None
    key = make_key("reviewer", tenant=TENANT)
    deadline = time.monotonic() + WAIT_S
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as c:
        while True:
            body = c.get(f"/v1/studies/{row[0]}").json()
            # Each association queues on release: wait until no instance is left unprocessed.
            settled = all(i["status"] != "stored" for i in body["instances"])
            if (body["status"] in TERMINAL and settled) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert body["status"] in {"done", "needs_review"}, body
    # Queued on release, not after the 60 s stable age.
    assert time.monotonic() < sent + STABLE_AGE_S
    with psycopg.connect(database_url) as conn:
        audits = conn.execute(
            "SELECT detail FROM audit_log WHERE action = 'study.dimse' AND resource_id = %s",
            (str(row[0]),),
        ).fetchall()
    assert len(audits) == 2 and all(a[0]["released"] for a in audits)
    assert all(i["status"] == "done" for i in body["instances"]), [
        (i["status"], i["error"]) for i in body["instances"]
    ]


def test_pynetdicom_scu_statuses(scp: int, database_url: str) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    good = dcmread(io.BytesIO(_instance(4, study_uid, series_uid)))
    no_pixels = dcmread(io.BytesIO(_instance(5, study_uid, series_uid)))
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = generate_uid()
    no_study = dcmread(io.BytesIO(_instance(6, study_uid, series_uid)))
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = generate_uid()

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ComputedRadiographyImageStorage, good.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        statuses: list[Dataset] = [
            assoc.send_c_store(ds) for ds in (good, good, no_pixels, no_study)
        ]
    finally:
        assoc.release()
    codes = [int(s.Status) for s in statuses]
    assert codes == [0x0000, 0x0000, 0xA900, 0xC000]
    assert "pixel" in str(statuses[2].ErrorComment).lower()
    assert "StudyInstanceUID" in str(statuses[3].ErrorComment)
    assert _count(database_url, study_uid) == 1


def test_unknown_calling_ae_is_rejected_when_a_list_is_set(
    stack: Any, settings_env: dict[str, str], tmp_path: Path
) -> None:
    port = _free_port()
    proc = _start(
        {**settings_env, "MEDTRIAGE_DIMSE_CALLING_AETS": "MODALITY1, PACS"},
        port,
        tmp_path / "scp.log",
    )
    try:
        refused = subprocess.run(
            [_dcmtk("echoscu"), "-aet", "STRANGER", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )
        allowed = subprocess.run(
            [_dcmtk("echoscu"), "-aet", "PACS", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )
    finally:
        _stop(proc)
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower(), refused.stderr
    assert allowed.returncode == 0, allowed.stderr


def test_c_store_past_the_queue_limit_is_a700_and_stores_nothing(
    stack: Any, settings_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    prefix = f"dimse-bp-{uuid.uuid4().hex[:8]}"
    queue = Queue(
        f"{prefix}:studies", connection=Redis.from_url(settings_env["MEDTRIAGE_REDIS_URL"])
    )
    queue.enqueue("builtins.print", "waiting")  # no worker reads this queue
    port = _free_port()
    env = {
        **settings_env,
        "MEDTRIAGE_QUEUE_PREFIX": prefix,
        "MEDTRIAGE_MAX_QUEUE_DEPTH": "1",
        "MEDTRIAGE_DIMSE_TENANT": TENANT,
    }
    proc = _start(env, port, tmp_path / "scp.log")
    study_uid = generate_uid()
    ds = dcmread(io.BytesIO(_instance(7, study_uid, generate_uid())))
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
    finally:
        _stop(proc)
        queue.delete(delete_jobs=True)
    assert int(status.Status) == 0xA700
    assert "retry" in str(status.ErrorComment)
    assert _count(database_url, study_uid) == 0


def test_storescu_large_multiframe_is_received_to_disk_and_streamed(
    scp: int, tmp_path: Path, database_url: str
) -> None:
    frames = 10  # 1024 x 1024 x 10 x 2 bytes = 20 MiB, over the 16 MiB streaming threshold
    ds = dcmread(io.BytesIO(_instance(8, generate_uid(), generate_uid())))
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(range(256)) * (1024 * 1024 * frames * 2 // 256)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(
        [_dcmtk("storescu"), "-v", "-aec", AE_TITLE, "127.0.0.1", str(scp), str(path)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert "Received Store Response (Success)" in result.stderr, result.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT frames, size_bytes FROM instances WHERE sop_uid = %s", (ds.SOPInstanceUID,)
        ).fetchone()
    assert row is not None
    assert row[0] == frames and row[1] > 1024 * 1024 * frames * 2


@pytest.mark.parametrize(
    ("syntax", "option"),
    [(JPEG2000Lossless, "-xv"), (JPEGLSLossless, "-xt")],
    ids=["jpeg2000-lossless", "jpeg-ls-lossless"],
)
def test_storescu_compressed_syntaxes_are_stored_as_sent_and_processed(
    scp: int, tmp_path: Path, database_url: str, make_key: Any, stack: Any, syntax: str, option: str
) -> None:
    study_uid = generate_uid()
    ds = dcmread(io.BytesIO(_instance(9, study_uid, generate_uid())))
    ds.compress(syntax)
    path = tmp_path / "compressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(
        [_dcmtk("storescu"), "-v", option, "-aec", AE_TITLE, "127.0.0.1", str(scp), str(path)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert "Received Store Response (Success)" in result.stderr, result.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT i.transfer_syntax_uid, s.id FROM instances i JOIN studies s"
            " ON s.id = i.study_id WHERE i.sop_uid = %s",
            (ds.SOPInstanceUID,),
        ).fetchone()
    assert row is not None and row[0] == syntax
    key = make_key("reviewer", tenant=TENANT)
    deadline = time.monotonic() + WAIT_S
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as c:
        while True:
            body = c.get(f"/v1/studies/{row[1]}").json()
            if body["status"] in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert body["status"] in {"done", "needs_review"}, body
    assert body["instances"][0]["status"] == "done", body["instances"][0]


# Studies in one association: their ids, comma-joined, once overflowed the audit index (#24).
MANY_STUDIES = 120
TINY = 16


@pytest.fixture()
def quiet_env(database_url: str, redis_url: str, storage_dir: Path) -> Iterator[dict[str, str]]:
    """A receiver's settings with a queue of its own that no worker reads (so the studies it
    queues stay queued, and no Triton is needed)."""
    prefix = f"dimse-many-{uuid.uuid4().hex[:8]}"
    yield {
        "MEDTRIAGE_DATABASE_URL": database_url,
        "MEDTRIAGE_REDIS_URL": redis_url,
        "MEDTRIAGE_QUEUE_PREFIX": prefix,
        "MEDTRIAGE_STORAGE_URL": f"file://{storage_dir}",
        "MEDTRIAGE_DIMSE_TENANT": TENANT,
    }
    Queue(f"{prefix}:studies", connection=Redis.from_url(redis_url)).delete(delete_jobs=True)


def test_one_association_of_many_studies_is_audited_per_study(
    quiet_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    images, _ = load_samples()
    folder = tmp_path / "many"
    folder.mkdir()
    study_uids = [generate_uid() for _ in range(MANY_STUDIES)]
    for i, study_uid in enumerate(study_uids):
        image = images[i % len(images)]
        (folder / f"IM{i:04d}").write_bytes(radiograph(image, study_uid=study_uid, size=TINY))
    port = _free_port()
    log = tmp_path / "scp.log"
    proc = _start(quiet_env, port, log)
    try:
        result = subprocess.run(
            [_dcmtk("storescu"), "-v", "+sd", "-aet", "MODALITY", "-aec", AE_TITLE]
            + ["127.0.0.1", str(port), str(folder)],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.count("Received Store Response (Success)") == MANY_STUDIES
        # The audit rows are written after the release, on the receiver's side.
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with psycopg.connect(database_url) as conn:
                rows = conn.execute(
                    "SELECT resource_id, outcome, request_id, detail FROM audit_log"
                    " WHERE action = 'study.dimse' AND principal = 'dimse:MODALITY'"
                ).fetchall()
                ids = dict(
                    conn.execute(
                        "SELECT study_uid, id::text FROM studies WHERE study_uid = ANY(%s)",
                        (study_uids,),
                    ).fetchall()
                )
            if len(rows) >= MANY_STUDIES or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        _stop(proc)
    assert len(ids) == MANY_STUDIES
    assert sorted(r[0] for r in rows) == sorted(ids.values())
    assert {r[1] for r in rows} == {"ok"}
    # One association: its rows share one id, and each says what the whole association did.
    assert len({r[2] for r in rows}) == 1 and rows[0][2]
    for _, _, _, detail in rows:
        assert detail["studies"] == MANY_STUDIES and detail["released"] is True
        assert detail["instances"] == {"accepted": 1}
        assert detail["counts"] == {"accepted": MANY_STUDIES}
    text = log.read_text()
    assert "Traceback" not in text and "failed" not in text, text
    with psycopg.connect(database_url) as conn:
        assert verify(conn).ok
