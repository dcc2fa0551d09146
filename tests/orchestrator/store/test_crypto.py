"""Encryption at rest and integrity: AES-GCM sealed local objects with key rotation, a
planted value found nowhere in the raw store, SSE checked on S3, and a flipped byte failing
its instance with a clear reason before preprocessing."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from redis import Redis

from orchestrator.errors import StorageError
from orchestrator.ingest import core as ingest
from orchestrator.samples import load_samples, radiograph
from orchestrator.store.db import connect_pool
from orchestrator.store.db.keys import Principal, create_key
from orchestrator.store.encryption import (
    MAGIC,
    MAGIC_STREAM,
    NONCE_BYTES,
    SEALED_TEXT_PREFIX,
    EncryptedStore,
    KeyRing,
    ObjectTampered,
    key_id_of,
    new_key_entry,
    open_sealed,
    open_text,
    seal,
    seal_stream,
    seal_text,
)
from orchestrator.store.objects import LocalStore, S3Store, open_store

TERMINAL = {"done", "failed", "needs_review", "not_applicable"}
WAIT_S = 120.0


def _chest_film() -> bytes:
    """A paediatric chest CR film the chest models take (a CT slice is not_applicable)."""
    images, _ = load_samples()
    return radiograph(images[0], study_uid=generate_uid(), size=256)


def _dicom(marker: str) -> bytes:
    ds = dcmread(io.BytesIO(_chest_film()))
    ds.PatientName = marker
    ds.PatientID = marker[:16]
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_sealed_roundtrip_and_rotation(tmp_path: Path) -> None:
    old, new = new_key_entry("k1"), new_key_entry("k2")
    store = EncryptedStore(LocalStore(tmp_path), KeyRing.parse(old))
    store.put("a/b.dcm", b"PATIENT-SECRET" * 10)
    raw = (tmp_path / "a/b.dcm").read_bytes()
    assert raw.startswith(MAGIC) and b"PATIENT-SECRET" not in raw
    assert store.get("a/b.dcm") == b"PATIENT-SECRET" * 10
    # Rotation: the new key encrypts, the old one still opens what it sealed.
    rotated = EncryptedStore(LocalStore(tmp_path), KeyRing.parse(f"{new},{old}"))
    assert rotated.get("a/b.dcm") == b"PATIENT-SECRET" * 10
    rotated.put("a/c.dcm", b"x")
    assert key_id_of((tmp_path / "a/c.dcm").read_bytes()) == "k2"
    assert rotated.rewrap("a/b.dcm") and key_id_of((tmp_path / "a/b.dcm").read_bytes()) == "k2"
    only_new = EncryptedStore(LocalStore(tmp_path), KeyRing.parse(new))
    assert only_new.get("a/b.dcm") == b"PATIENT-SECRET" * 10
    # Dropping the old key too early makes its objects unreadable, and says why.
    only_new.inner.put("a/d.dcm", seal(KeyRing.parse(old), "a/d.dcm", b"y"))
    with pytest.raises(Exception, match="unknown key id 'k1'"):
        only_new.get("a/d.dcm")


def test_tampered_moved_and_plaintext_objects_are_refused(tmp_path: Path) -> None:
    store = EncryptedStore(LocalStore(tmp_path), KeyRing.parse(new_key_entry()))
    store.put("one", b"hello world")
    path = tmp_path / "one"
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ObjectTampered, match="integrity"):
        store.get("one")
    store.put("two", b"hello")
    shutil.copy(tmp_path / "two", tmp_path / "three")  # sealed for "two", served as "three"
    with pytest.raises(ObjectTampered):
        store.get("three")
    (tmp_path / "four").write_bytes(b"plain")
    with pytest.raises(ObjectTampered, match="not encrypted"):
        store.get("four")


def test_open_store_encrypts_local_stores_by_default(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'objects'}")
    store.put("k", b"PLAIN-VALUE")
    assert b"PLAIN-VALUE" not in (tmp_path / "objects" / "k").read_bytes()
    key_file = tmp_path / "objects.storage-key"
    assert key_file.stat().st_mode & 0o077 == 0  # owner-only
    # A second process opening the same store reads what the first wrote.
    assert open_store(f"file://{tmp_path / 'objects'}").get("k") == b"PLAIN-VALUE"


def test_processes_opening_a_fresh_store_together_share_one_key(tmp_path: Path) -> None:
    """API and workers start at once on a new store: each must see the same, whole key (a
    created-but-not-yet-written key file once made a worker exit with 'no encryption keys')."""
    root = tmp_path / "objects"
    code = (
        "import sys; from orchestrator.store.objects import open_store; "
        "s = open_store('file://' + sys.argv[1]); print(s.ring.active if hasattr(s, 'ring') else '')"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    for p in procs:
        assert p.stdout is not None
        p.stdout.close()
    assert [f.name for f in tmp_path.iterdir() if f.is_file()] == ["objects.storage-key"]
    open_store(f"file://{root}").put("k", b"v")
    assert open_store(f"file://{root}").get("k") == b"v"


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from orchestrator.cli.stack import free_port

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.mark.integration
@pytest.mark.parametrize("sse", ["AES256", "aws:kms"])
def test_s3_requests_and_checks_server_side_encryption(moto_s3: str, sse: str) -> None:
    import boto3

    bucket = f"sse-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    store = S3Store(bucket, "p", endpoint_url=moto_s3, server_side_encryption=sse)
    store.put("a", b"data")
    head = client.head_object(Bucket=bucket, Key="p/a")
    assert head["ServerSideEncryption"] == sse
    assert store.get("a") == b"data"
    # An object written without SSE (by something else) is not served.
    client.put_object(Bucket=bucket, Key="p/plain", Body=b"data")
    with pytest.raises(Exception, match="not server-side encrypted"):
        store.get("plain")


@pytest.mark.integration
def test_planted_value_is_nowhere_in_the_raw_store(
    stack: Any, storage_dir: Path, make_key: Any
) -> None:
    marker = f"ZZPLANT{uuid.uuid4().hex[:12].upper()}"
    key = make_key("uploader")
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as c:
        r = c.post("/v1/studies", files=[("files", ("p.dcm", _dicom(marker), "application/dicom"))])
        assert r.status_code == 202, r.text
        study_id = r.json()["id"]
        deadline = time.monotonic() + WAIT_S
        while (body := c.get(f"/v1/studies/{study_id}").json())["status"] not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert body["status"] in ("done", "needs_review"), body
        # The API still serves what it sealed: the report and the preview open.
        assert c.get(f"/v1/studies/{study_id}/report").status_code == 200
    files = [p for p in storage_dir.rglob("*") if p.is_file()]
    assert len(files) >= 3  # original, preview, report of this study at least
    needles = [marker.encode(), marker.encode("utf-16-le"), marker[:16].encode()]
    found = [p for p in files for n in needles if n in p.read_bytes()]
    # Sealed whole (MAGIC) or, for originals over 16 MB that other tests stream, by segments.
    unencrypted = [p for p in files if not p.read_bytes().startswith((MAGIC, MAGIC_STREAM))]
    print(f"\nraw store: {len(files)} objects, {len(unencrypted)} unencrypted, {len(found)} hits")
    assert found == []
    assert unencrypted == []


@pytest.mark.integration
def test_flipped_byte_fails_the_instance_before_preprocessing(
    settings_env: dict[str, str], database_url: str, redis_url: str, storage_dir: Path
) -> None:
    from orchestrator.pipeline.study import process_study
    from orchestrator.queue import jobs as jobqueue
    from orchestrator.queue.worker import build_context
    from orchestrator.settings import WorkerSettings

    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    # A queue no worker listens on: this test runs the job itself, after the tampering.
    fields["queue_prefix"] = f"crypto-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(**fields)
    store = open_store(settings.storage_url)
    pool = connect_pool(database_url)
    pool.wait()
    with psycopg.connect(database_url) as conn:
        key_id, _ = create_key(conn, tenant="tenant-crypto", name="t", role="uploader")
        tenant_id = conn.execute("SELECT id FROM tenants WHERE name = 'tenant-crypto'").fetchone()[
            0
        ]
    principal = Principal(key_id=key_id, tenant_id=tenant_id, name="t", role="uploader")
    study_uid = generate_uid()
    files = []
    for i in range(3):
        ds = dcmread(io.BytesIO(_dicom(f"FLIP{i}")))
        ds.StudyInstanceUID = study_uid
        # One patient per study (ingest refuses an instance of another patient).
        ds.PatientName, ds.PatientID = "FLIP^PATIENT", "FLIP-PATIENT"
        buf = io.BytesIO()
        ds.save_as(buf)
        files.append((f"f{i}.dcm", buf.getvalue()))
    redis = Redis.from_url(redis_url)
    result = ingest.ingest(
        pool,
        store,
        redis,
        settings.queue_name,
        principal,
        files,
        max_pixels=10**9,
        job_timeout_s=60,
    )
    study_id = next(iter(result.studies))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, object_key FROM instances WHERE study_id = %s ORDER BY created_at, sop_uid",
            (study_id,),
        ).fetchall()
    assert len(rows) == 3
    # 1: one flipped byte in the stored ciphertext (AES-GCM tag fails).
    path = storage_dir / rows[0][1]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    path.write_bytes(bytes(blob))
    # 2: a well-sealed object whose content changed (a byte of the DICOM): SHA-256 differs.
    original = bytearray(store.get(rows[1][1]))
    original[-1] ^= 0x01
    store.put(rows[1][1], bytes(original))
    ctx = build_context(settings, "test-crypto")
    try:
        process_study(ctx, study_id, jobqueue.job_id(study_id))
    finally:
        ctx.pool.close()
        pool.close()
        for leftover in redis.scan_iter(f"{fields['queue_prefix']}:*"):
            redis.delete(leftover)  # the job this test ran itself
    with psycopg.connect(database_url) as conn:
        states = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT id, status, error FROM instances WHERE study_id = %s", (study_id,)
            )
        }
    assert states[rows[0][0]][0] == "failed" and "AES-GCM integrity" in states[rows[0][0]][1]
    assert (
        states[rows[1][0]][0] == "failed" and "SHA-256 recorded at ingest" in states[rows[1][0]][1]
    )
    assert states[rows[2][0]][0] == "done", states[rows[2][0]]


def test_sealed_text_opens_only_for_its_context_and_keys() -> None:
    """Short secrets in the database (webhook signing secrets): sealed under the active key,
    bound to their row; values stored before sealing pass through."""
    old = KeyRing.parse(new_key_entry("old"))
    rotated = KeyRing(
        [("new", KeyRing.parse(new_key_entry("new")).key("new")), ("old", old.key("old"))]
    )
    sealed = seal_text(old, "webhook:a:secret", "s3cr3t")
    assert sealed.startswith(SEALED_TEXT_PREFIX) and "s3cr3t" not in sealed
    assert open_text(old, "webhook:a:secret", sealed) == "s3cr3t"
    assert open_text(rotated, "webhook:a:secret", sealed) == "s3cr3t"  # after a rotation
    with pytest.raises(ObjectTampered):
        open_text(old, "webhook:b:secret", sealed)  # copied to another endpoint's row
    with pytest.raises(StorageError):
        open_text(None, "webhook:a:secret", sealed)  # keys not configured
    with pytest.raises(StorageError):
        open_text(KeyRing.parse(new_key_entry("other")), "webhook:a:secret", sealed)
    assert open_text(None, "webhook:a:secret", "plain-legacy") == "plain-legacy"


def _framing_errors(ring: KeyRing) -> dict[str, bytes]:
    """Sealed objects cut or bent inside their framing, in both layouts."""
    one = bytes(seal(ring, "obj", b"DICOM" * 50))
    stream = b"".join(seal_stream(ring, "obj", [b"DICOM" * 50], segment_bytes=64))
    kid_len = one[len(MAGIC)]
    nonce_at = len(MAGIC) + 1 + kid_len
    return {
        "magic only": MAGIC,
        "cut inside the key id": one[: len(MAGIC) + 1 + kid_len // 2],
        "cut after the key id": one[:nonce_at],
        "cut inside the nonce": one[: nonce_at + NONCE_BYTES // 2],
        "cut inside the tag": one[: nonce_at + NONCE_BYTES + 5],
        "key id length past the end": MAGIC + b"\xff" + one[5:20],
        "key id not ascii": one[: len(MAGIC) + 1] + b"\xff" * kid_len + one[nonce_at:],
        "stream magic only": MAGIC_STREAM + b"\x05",
        "stream cut inside the header": stream[: len(MAGIC_STREAM) + 1 + kid_len + 3],
        "stream zero segment size": stream[: len(MAGIC_STREAM) + 1 + kid_len + 7]
        + b"\x00\x00\x00\x00"
        + stream[len(MAGIC_STREAM) + 1 + kid_len + 11 :],
        "stream cut inside a segment": stream[: len(stream) - 40],
        "stream cut after the header": stream[: len(MAGIC_STREAM) + 1 + kid_len + 11],
    }


def test_every_framing_error_is_an_integrity_failure() -> None:
    """A truncated or bent sealed object is tampering (ObjectTampered), never a ValueError,
    an IndexError or a bare StorageError that would fail the whole study."""
    ring = KeyRing.parse(new_key_entry("kid-long-enough"))
    for name, blob in _framing_errors(ring).items():
        with pytest.raises(ObjectTampered, match="obj"):
            open_sealed(ring, "obj", blob)
        assert key_id_of(blob) is None or isinstance(key_id_of(blob), str), name
    # A well-framed object under a key this ring does not hold is refused the same way,
    # naming the key id so a key dropped too early is recognisable.
    other = bytes(seal(KeyRing.parse(new_key_entry("gone")), "obj", b"x"))
    with pytest.raises(ObjectTampered, match="unknown key id 'gone'"):
        open_sealed(ring, "obj", other)


@pytest.mark.integration
def test_truncated_objects_fail_their_instance_and_the_rest_is_inferred(
    settings_env: dict[str, str], database_url: str, redis_url: str, storage_dir: Path
) -> None:
    """Stored originals cut inside their nonce, inside their key id, or replaced by a cut
    segmented header: each fails alone as an integrity failure; the intact instance is
    inferred and the study gets its report."""
    from orchestrator.pipeline.study import process_study
    from orchestrator.queue import jobs as jobqueue
    from orchestrator.queue.worker import build_context
    from orchestrator.settings import WorkerSettings

    fields = {k.removeprefix("MEDTRIAGE_").lower(): v for k, v in settings_env.items()}
    fields["queue_prefix"] = f"crypto-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(**fields)
    store = open_store(settings.storage_url)
    pool = connect_pool(database_url)
    pool.wait()
    with psycopg.connect(database_url) as conn:
        key_id, _ = create_key(conn, tenant="tenant-crypto-cut", name="t", role="uploader")
        tenant_id = conn.execute(
            "SELECT id FROM tenants WHERE name = 'tenant-crypto-cut'"
        ).fetchone()[0]
    principal = Principal(key_id=key_id, tenant_id=tenant_id, name="t", role="uploader")
    study_uid = generate_uid()
    files = []
    for i in range(4):
        ds = dcmread(io.BytesIO(_dicom(f"CUT{i}")))
        ds.StudyInstanceUID = study_uid
        # One patient per study (ingest refuses an instance of another patient).
        ds.PatientName, ds.PatientID = "CUT^PATIENT", "CUT-PATIENT"
        buf = io.BytesIO()
        ds.save_as(buf)
        files.append((f"f{i}.dcm", buf.getvalue()))
    redis = Redis.from_url(redis_url)
    result = ingest.ingest(
        pool,
        store,
        redis,
        settings.queue_name,
        principal,
        files,
        max_pixels=10**9,
        job_timeout_s=60,
    )
    study_id = next(iter(result.studies))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, object_key FROM instances WHERE study_id = %s ORDER BY created_at, sop_uid",
            (study_id,),
        ).fetchall()
    assert len(rows) == 4
    sealed = (storage_dir / rows[0][1]).read_bytes()
    nonce_at = len(MAGIC) + 1 + sealed[len(MAGIC)]
    (storage_dir / rows[0][1]).write_bytes(sealed[: nonce_at + 5])  # inside the nonce
    (storage_dir / rows[1][1]).write_bytes(sealed[: nonce_at - 2])  # inside the key id
    (storage_dir / rows[2][1]).write_bytes(MAGIC_STREAM + sealed[4:9])  # cut stream header
    ctx = build_context(settings, "test-crypto-cut")
    try:
        process_study(ctx, study_id, jobqueue.job_id(study_id))
    finally:
        ctx.pool.close()
        pool.close()
        for leftover in redis.scan_iter(f"{fields['queue_prefix']}:*"):
            redis.delete(leftover)
    with psycopg.connect(database_url) as conn:
        states = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT id, status, error FROM instances WHERE study_id = %s", (study_id,)
            )
        }
        study = conn.execute("SELECT status FROM studies WHERE id = %s", (study_id,)).fetchone()
        reports = conn.execute(
            "SELECT count(*) FROM reports WHERE study_id = %s", (study_id,)
        ).fetchone()[0]
    for row in rows[:3]:
        status, error = states[row[0]]
        assert status == "failed" and error.startswith("integrity:"), (status, error)
    assert states[rows[3][0]][0] == "done", states[rows[3][0]]
    assert study is not None and study[0] in ("done", "needs_review"), study
    assert reports >= 1
