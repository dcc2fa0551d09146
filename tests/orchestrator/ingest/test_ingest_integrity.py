"""Ingest integrity (issue 15) on every ingest path: REST and STOW-RS (the real app in
process), C-STORE (DCMTK's storescu against the real receiver) and ``medtriage import``, over
real PostgreSQL and Redis and a database of their own.

- invalid, empty or free-text UIDs are refused with a reason that names the tag;
- an instance of another patient claiming a stored study is refused, counted and audited;
- the same SOPInstanceUID with other content is a conflict (the original kept), with the
  same content a duplicate, and every path says which.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRBigEndian, RLELossless, generate_uid
from redis import Redis

import preprocess
from orchestrator import metrics
from orchestrator.api.app import create_app
from orchestrator.ingest import core as ingest
from orchestrator.ingest import dimse, importer
from orchestrator.ingest import rules as ingest_rules
from orchestrator.ingest.dimse import StoreSCP
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import ApiSettings
from orchestrator.store.db import connect_pool, upgrade
from orchestrator.store.db.keys import Principal, create_key, ensure_tenant
from orchestrator.store.objects import LocalStore
from preprocess.decode import decode_frame

pytestmark = pytest.mark.integration

ADMIN_DATABASE_URL = os.environ.get(
    "MEDTRIAGE_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TENANT = "tenant-integrity"
AE_TITLE = "MEDTRIAGE"
TOOL_TIMEOUT_S = 60
JOB_TIMEOUT_S = 60
BOUNDARY = "integrity-boundary"
PATHS = ("rest", "stow", "dimse", "import")

# name -> (tag keyword, value): each must be refused on every path, nothing stored.
BAD_UIDS = {
    "empty-study": ("StudyInstanceUID", ""),
    "script-study": ("StudyInstanceUID", "<script>alert(1)</script>"),
    "text-series": ("SeriesInstanceUID", "series one"),
    "leading-zero-sop": ("SOPInstanceUID", "1.2.03.4"),
    "empty-component-study": ("StudyInstanceUID", "1.2..3"),
    "too-long-series": ("SeriesInstanceUID", "1." + "2" * 70),
}


@pytest.fixture
def database_url_own() -> Iterator[str]:
    name = f"medtriage_integrity_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def env(database_url_own: str, redis_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    prefix = f"integrity-{uuid.uuid4().hex[:8]}"
    settings_ = ApiSettings(
        database_url=database_url_own,
        redis_url=redis_url,
        queue_prefix=prefix,
        storage_url=f"file://{tmp_path / 'objects'}",
        triton_grpc_url="127.0.0.1:9",
        triton_http_url="http://127.0.0.1:9",
    )
    pool = connect_pool(database_url_own)
    pool.wait()
    with psycopg.connect(database_url_own) as conn:
        tenant_id = ensure_tenant(conn, TENANT)
        key = create_key(conn, tenant=TENANT, name="uploader", role="uploader")[1]
        admin = create_key(conn, tenant=TENANT, name="admin", role="admin")[1]
    redis = Redis.from_url(redis_url)
    store = LocalStore(tmp_path / "objects")
    scp = StoreSCP(
        pool,
        store,
        redis,
        settings_.queue_name,
        tenant=TENANT,
        ae_title=AE_TITLE,
        max_pixels=10**8,
        job_timeout_s=JOB_TIMEOUT_S,
        max_queue_depth=0,
        max_queue_age_s=0,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = scp.start("127.0.0.1", port)
    with TestClient(create_app(settings_)) as client:
        yield {
            "client": client,
            "key": key,
            "admin": admin,
            "port": port,
            "pool": pool,
            "redis": redis,
            "store": store,
            "settings": settings_,
            "database_url": database_url_own,
            "tenant_id": tenant_id,
            "tmp": tmp_path,
        }
    server.shutdown()
    pool.close()


def _instance(
    study_uid: str | None = None,
    *,
    index: int = 0,
    sop_uid: str | None = None,
    **tags: Any,
) -> bytes:
    images, _ = load_samples()
    raw = radiograph(images[index], study_uid=study_uid or generate_uid(), size=64)
    ds = dcmread(io.BytesIO(raw))
    if sop_uid is not None:
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    # Writing what the standard forbids is the point: pydicom would refuse or fix it.
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds.save_as(buf, enforce_file_format=False)
    finally:
        pydicom_config.settings.writing_validation_mode = old
    return buf.getvalue()


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _rest(env: dict[str, Any], data: bytes) -> tuple[str, str | None, str | None]:
    r = env["client"].post(
        "/v1/studies",
        files=[("files", ("x.dcm", data, "application/dicom"))],
        headers=_headers(env["key"]),
    )
    assert r.status_code in (202, 422), r.text
    (f,) = r.json()["files"]
    return f["outcome"], f.get("category"), f.get("reason")


def _stow_raw(env: dict[str, Any], data: bytes) -> Any:
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
    body += f"\r\n--{BOUNDARY}--\r\n".encode()
    return env["client"].post(
        "/dicomweb/studies",
        content=body,
        headers={
            **_headers(env["key"]),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        },
    )


def _stow(env: dict[str, Any], data: bytes) -> tuple[str, str | None, str | None]:
    """(outcome, FailureReason/WarningReason as hex, Warning header) of one instance."""
    r = _stow_raw(env, data)
    body = r.json()
    warning = r.headers.get("warning")
    if "00081199" in body:  # ReferencedSOPSequence
        (item,) = body["00081199"]["Value"]
        if "00081196" in item:  # WarningReason
            return "duplicate", f"{item['00081196']['Value'][0]:04X}", warning
        return "accepted", None, warning
    (item,) = body["00081198"]["Value"]  # FailedSOPSequence
    return "rejected", f"{item['00081197']['Value'][0]:04X}", warning


# storescu proposes only the SOP classes it knows, unless a configuration profile lists more.
_PRIVATE_CONFIG = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[Private]
PresentationContext1 = {sop_class}\\Uncompressed

[[Profiles]]
[Private]
PresentationContexts = Private
"""


def _dimse(
    env: dict[str, Any], data: bytes, proposal: tuple[str, ...] = ("-R",)
) -> tuple[str, str | None, str | None]:
    """(outcome, status as hex, error comment) from DCMTK's storescu (debug output);
    ``proposal``: its presentation context options (-R: the file's SOP class)."""
    path = env["tmp"] / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    storescu = shutil.which("storescu")
    assert storescu, "storescu not found: install the Debian package dcmtk"
    result = subprocess.run(
        [
            storescu,
            "-d",
            "-nh",
            *proposal,
            "-aec",
            AE_TITLE,
            "127.0.0.1",
            str(env["port"]),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    out = result.stdout + result.stderr
    status = comment = None
    for line in out.splitlines():
        if "DIMSE Status" in line:  # "D: DIMSE Status   : 0x0000: Success"
            status = line.split(":")[2].strip().removeprefix("0x").upper()
        if "ErrorComment" in line:  # "D: (0000,0902) LO [text]  #  38, 1 ErrorComment"
            comment = line[line.index("[") + 1 : line.rindex("]")]
    assert status is not None, out
    if status == "0000":
        return ("duplicate" if comment else "accepted"), status, comment
    return "rejected", status, comment


def _import(env: dict[str, Any], data: bytes) -> tuple[str, str | None, str | None]:
    folder = env["tmp"] / f"import-{uuid.uuid4().hex}"
    folder.mkdir()
    (folder / "x.dcm").write_bytes(data)
    s = env["settings"]
    summary = importer.run(
        env["pool"],
        env["store"],
        env["redis"],
        s.queue_name,
        root=folder,
        tenant=TENANT,
        max_pixels=10**8,
        max_bytes=10**9,
        job_timeout_s=JOB_TIMEOUT_S,
        progress=io.StringIO(),
    )
    if summary.rejected:
        return "rejected", None, summary.rejected[0][1]
    return ("accepted" if summary.imported else "duplicate"), None, None


SEND: dict[str, Callable[[dict[str, Any], bytes], tuple[str, str | None, str | None]]] = {
    "rest": _rest,
    "stow": _stow,
    "dimse": _dimse,
    "import": _import,
}


def _instances(env: dict[str, Any]) -> int:
    with psycopg.connect(env["database_url"]) as conn:
        row = conn.execute("SELECT count(*) FROM instances").fetchone()
    assert row is not None
    return int(row[0])


def _study_uids(env: dict[str, Any]) -> set[str]:
    with psycopg.connect(env["database_url"]) as conn:
        return {str(r[0]) for r in conn.execute("SELECT study_uid FROM studies")}


@pytest.mark.parametrize("path", PATHS)
def test_invalid_uids_are_refused_with_the_tag_named(env: dict[str, Any], path: str) -> None:
    for name, (keyword, value) in BAD_UIDS.items():
        tags: dict[str, Any] = {keyword: value}
        outcome, code, reason = SEND[path](env, _instance(None, **tags))
        assert outcome == "rejected", (name, outcome, code, reason)
        if path == "stow":
            assert code == "C000", name
        elif path == "dimse":
            assert code == "C000" and reason and keyword in reason, (name, code, reason)
        else:
            assert reason and keyword in reason and "<script>" not in reason, (name, reason)
    assert _instances(env) == 0
    assert _study_uids(env) == set()


@pytest.mark.parametrize("path", PATHS)
def test_coded_values_are_normalised_or_refused(env: dict[str, Any], path: str) -> None:
    outcome, _, _ = SEND[path](env, _instance(Modality=" cr "))
    assert outcome == "accepted"
    with psycopg.connect(env["database_url"]) as conn:
        assert {r[0] for r in conn.execute("SELECT modality FROM series")} == {"CR"}
    bad: list[dict[str, Any]] = [{"Modality": "<b>CT</b>"}, {"PhotometricInterpretation": "GREEN"}]
    for tags in bad:
        outcome, _, _ = SEND[path](env, _instance(None, **tags))
        assert outcome == "rejected", tags
    assert _instances(env) == 1


def _conflicts(path: str, kind: str) -> float:
    value = metrics.INGEST_CONFLICTS.labels(path, kind)._value.get()
    return float(value)


@pytest.mark.parametrize("path", PATHS)
def test_another_patients_instance_never_joins_a_study(env: dict[str, Any], path: str) -> None:
    study_uid = generate_uid()
    secret_id, secret_name = "PID-SECRET-7731", "SECRETNAME^PAT"
    first = _instance(study_uid, PatientID="PID-A-1", PatientName="DOE^JANE")
    assert SEND[path](env, first)[0] == "accepted"
    before = _conflicts(path, ingest.PATIENT)
    # Another PatientID; then the same (empty) id but another name and birth date.
    other_id = _instance(study_uid, index=1, PatientID=secret_id, PatientName="DOE^JANE")
    outcome, code, reason = SEND[path](env, other_id)
    assert outcome == "rejected", (outcome, code, reason)
    assert code == {"rest": ingest.PATIENT, "import": None}.get(path, "A900"), code
    assert reason is None or ("patient" in reason and secret_id not in reason)
    same_patient = _instance(study_uid, index=2, PatientID="PID-A-1", PatientName="doe^jane^^")
    assert SEND[path](env, same_patient)[0] == "accepted"

    demo_study = generate_uid()
    a = _instance(demo_study, PatientID="", PatientName="ROE^RICK", PatientBirthDate="19700101")
    b = _instance(
        demo_study, index=1, PatientID="", PatientName=secret_name, PatientBirthDate="19810202"
    )
    assert SEND[path](env, a)[0] == "accepted"
    outcome, _, reason = SEND[path](env, b)
    assert outcome == "rejected"
    assert reason is None or ("SECRETNAME" not in reason and "19810202" not in reason)

    assert _instances(env) == 3
    assert _conflicts(path, ingest.PATIENT) == before + 2
    # Operators see them in the audit log, without the patient's values.
    r = env["client"].get(
        "/v1/audit", params={"action": "ingest.conflict"}, headers=_headers(env["admin"])
    )
    assert r.status_code == 200, r.text
    rows = [row for row in r.json()["items"] if row["action"] == "ingest.conflict"]
    assert len(rows) == 2 and all(row["detail"]["kind"] == ingest.PATIENT for row in rows)
    assert all(row["detail"]["ingest_path"] == path for row in rows)
    assert secret_id not in r.text and "SECRETNAME" not in r.text


@pytest.mark.parametrize("path", PATHS)
def test_same_sop_instance_same_content_is_a_duplicate_other_content_a_conflict(
    env: dict[str, Any], path: str
) -> None:
    study_uid, sop_uid = generate_uid(), generate_uid()
    original = _instance(study_uid, sop_uid=sop_uid)
    assert SEND[path](env, original)[0] == "accepted"
    with psycopg.connect(env["database_url"]) as conn:
        (stored_sha,) = conn.execute("SELECT sha256 FROM instances").fetchone() or ("",)

    outcome, code, note = SEND[path](env, original)
    assert outcome == "duplicate", (outcome, code, note)
    if path == "stow":
        assert code == "0111" and note and "already stored" in note
    if path == "dimse":
        assert note and "already stored" in note

    before = _conflicts(path, ingest.SOP)
    other_pixels = _instance(study_uid, index=1, sop_uid=sop_uid)
    other_class = _instance(study_uid, sop_uid=sop_uid, SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    for changed in (other_pixels, other_class):
        outcome, code, reason = SEND[path](env, changed)
        assert outcome == "rejected", (outcome, code, reason)
        if path in ("stow", "dimse"):
            assert code == "0111", code
        if reason is not None:
            assert "conflict" in reason
    assert _conflicts(path, ingest.SOP) == before + 2
    with psycopg.connect(env["database_url"]) as conn:
        rows = conn.execute("SELECT sha256 FROM instances").fetchall()
    assert rows == [(stored_sha,)]  # the original, never stored over


def test_rest_upload_with_every_file_refused_keeps_the_per_file_shape(
    env: dict[str, Any],
) -> None:
    r = env["client"].post(
        "/v1/studies",
        files=[
            ("files", ("a.dcm", _instance(StudyInstanceUID=""), "application/dicom")),
            ("files", ("b.dcm", b"junk" * 40, "application/dicom")),
        ],
        headers=_headers(env["key"]),
    )
    assert r.status_code == 422
    body = r.json()
    assert [f["filename"] for f in body["files"]] == ["a.dcm", "b.dcm"]
    assert all(f["outcome"] == "rejected" and f["reason"] for f in body["files"])
    assert "a.dcm: a.dcm" not in body["detail"]


# --- generated shapes of the same kinds (seeded; no extra dependency) ----------------------

FUZZ_SEED = 20261202
FUZZ_CASES = 2000
_ALPHABET = "0123456789." * 6 + "0.\0 -_aZ<>/\u00e9\x7f"


def _conformant(text: str) -> bool:
    body = text[:-1] if text.endswith("\0") else text
    return (
        0 < len(body) <= 64
        and all(c in "0123456789." for c in body)
        and all(p and (p == "0" or not p.startswith("0")) for p in body.split("."))
    )


def _uid_cases(rng: random.Random) -> Iterator[str]:
    """UIDs built from valid components, then broken in the ways senders break them."""
    for _ in range(FUZZ_CASES):
        parts = [
            rng.choice(["0", str(rng.randint(1, 10 ** rng.randint(1, 12)))])
            for _ in range(rng.randint(1, 12))
        ]
        uid = ".".join(parts)
        mutation = rng.randrange(6)
        if mutation == 1:  # a random character somewhere
            at = rng.randrange(len(uid) + 1)
            uid = uid[:at] + rng.choice(_ALPHABET) + uid[at:]
        elif mutation == 2:  # leading zero in a component
            uid = uid.replace(".", ".0", 1)
        elif mutation == 3:  # an empty component
            uid = rng.choice([".", ""]) + uid + rng.choice([".", ""])
        elif mutation == 4:  # random text
            uid = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 80)))
        yield uid


def test_generated_uids_are_judged_by_the_ui_rules() -> None:
    for uid in _uid_cases(random.Random(FUZZ_SEED)):
        problem = ingest_rules.uid_problem(uid)
        assert (problem is None) == _conformant(uid), (uid, problem)
        if problem and len(uid) > 2:
            assert uid not in problem


def test_ingest_never_stores_an_instance_with_a_generated_bad_uid(env: dict[str, Any]) -> None:
    """The check every path shares, over generated values in each of the three UIDs:
    conformant ones are accepted, the rest refused naming the tag and never the value."""
    rng = random.Random(FUZZ_SEED + 1)
    template = dcmread(io.BytesIO(_instance()))
    principal = Principal(uuid.uuid4(), env["tenant_id"], "fuzz", "uploader", kind="service")
    cases = list(_uid_cases(rng))[:60]
    for i, value in enumerate(cases):
        keyword = ingest_rules.REQUIRED_UIDS[i % 3][0]
        ds = template.copy()
        for fresh in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, fresh, generate_uid())
        setattr(ds, keyword, value)
        buf = io.BytesIO()
        old = pydicom_config.settings.writing_validation_mode
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
        try:
            ds.save_as(buf, enforce_file_format=False)
        finally:
            pydicom_config.settings.writing_validation_mode = old
        outcome = ingest.ingest_file(
            env["pool"],
            env["store"],
            principal,
            "f.dcm",
            buf.getvalue(),
            max_pixels=10**8,
            priority=None,
        )
        # pydicom strips trailing spaces and NULs of a UI value as it reads it.
        stored_as = value.rstrip(" \0")
        if _conformant(stored_as):
            assert outcome.outcome == "accepted", (keyword, value, outcome)
        else:
            assert outcome.outcome == "rejected", (keyword, value, outcome)
            assert outcome.reason and keyword in outcome.reason
            if len(value) > 2:
                assert value not in outcome.reason


@pytest.mark.parametrize("path", PATHS)
def test_a_private_image_sop_class_is_accepted_on_every_path(
    env: dict[str, Any], path: str
) -> None:
    """Issue 15 item 10: C-STORE refused private and unknown image SOP classes at
    association while REST and STOW-RS stored them."""
    private = "1.2.826.0.1.3680043.8.498.1.15"
    data = _instance(None, SOPClassUID=private)
    ds = dcmread(io.BytesIO(data))
    ds.file_meta.MediaStorageSOPClassUID = UID(private)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    if path == "dimse":
        config = env["tmp"] / "storescu.cfg"
        config.write_text(_PRIVATE_CONFIG.format(sop_class=private))
        outcome, code, reason = _dimse(env, buf.getvalue(), ("-xf", str(config), "Private"))
    else:
        outcome, code, reason = SEND[path](env, buf.getvalue())
    assert outcome == "accepted", (outcome, code, reason)
    with psycopg.connect(env["database_url"]) as conn:
        assert [r[0] for r in conn.execute("SELECT sop_class_uid FROM instances")] == [private]


def _without_file_meta(data: bytes, *, implicit: bool = True) -> bytes:
    ds = dcmread(io.BytesIO(data))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def _with_stale_meta_block(data: bytes, syntax: str) -> bytes:
    """A Part 10 file whose data set starts with a stale group-0002 block naming another
    (0002,0010) TransferSyntaxUID: left by a tool that rewrote the file."""
    group_length = int.from_bytes(data[140:144], "little")
    end = 144 + group_length
    value = syntax.encode() + b"\0" * (len(syntax) % 2)
    stale = b"\x02\x00\x10\x00UI" + len(value).to_bytes(2, "little") + value
    return data[:end] + stale + data[end:]


@pytest.mark.parametrize("path", PATHS)
def test_a_file_without_file_meta_is_stored_as_the_worker_will_decode_it(
    env: dict[str, Any], path: str
) -> None:
    """Issue 15 item 5: accepted over REST/STOW, then 'no Transfer Syntax UID' in the
    worker. Now ingest settles the syntax the data set was encoded in, as decoding does."""
    data = _without_file_meta(_instance(None))
    assert data[128:132] != b"DICM"
    outcome, code, reason = SEND[path](env, data)
    assert outcome == "accepted", (outcome, code, reason)
    with psycopg.connect(env["database_url"]) as conn:
        (syntax,) = conn.execute("SELECT transfer_syntax_uid FROM instances").fetchone() or ("",)
        (key,) = conn.execute("SELECT object_key FROM instances").fetchone() or ("",)
    # C-STORE receives it as the negotiated syntax; the other paths deduce Implicit VR LE.
    assert syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"), syntax
    # What the worker does with the stored object: read and decode it.
    # The API's store encrypts at rest; the receiver and the import here write plain files.
    store = env["client"].app.state.services.store if path in ("rest", "stow") else env["store"]
    stored = preprocess.read_dicom(store.get(key))
    assert decode_frame(stored, 0, 1).shape == (64, 64)


def test_compressed_pixels_without_a_transfer_syntax_are_refused_at_ingest(
    env: dict[str, Any],
) -> None:
    ds = dcmread(io.BytesIO(_instance(None)))
    ds.compress(RLELossless)
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    for path in ("rest", "stow"):
        outcome, _, reason = SEND[path](env, buf.getvalue())
        assert outcome == "rejected", (path, outcome)
        if reason:
            assert "TransferSyntaxUID" in reason
    assert _instances(env) == 0


@pytest.mark.parametrize("path", ["rest", "stow", "import"])
def test_a_stale_group_0002_block_never_overrides_the_file_meta(
    env: dict[str, Any], path: str
) -> None:
    """Issue 15 item 6: File Meta says RLE Lossless, a stale block inside the data set says
    Explicit VR Little Endian; the stale one won and the file was refused as truncated.
    (C-STORE sends a data set without File Meta, so the shape cannot reach it.)"""
    ds = dcmread(io.BytesIO(_instance(None)))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = _with_stale_meta_block(buf.getvalue(), "1.2.840.10008.1.2.1")
    outcome, code, reason = SEND[path](env, data)
    assert outcome == "accepted", (outcome, code, reason)
    with psycopg.connect(env["database_url"]) as conn:
        (syntax,) = conn.execute("SELECT transfer_syntax_uid FROM instances").fetchone() or ("",)
    assert syntax == RLELossless


def test_truncated_means_the_bytes_ended_early(env: dict[str, Any]) -> None:
    data = _instance(None)
    outcome, category, reason = _rest(env, data[:-100])
    assert (outcome, category) == ("rejected", "truncated") and reason and "ends" in reason
    # Whole, but the tags declare more than the pixel data holds: no resend would help.
    ds = dcmread(io.BytesIO(_instance(None)))
    ds.Rows = 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    outcome, category, reason = _rest(env, buf.getvalue())
    assert (outcome, category) == ("rejected", "malformed"), reason
    assert reason and "send it again" not in reason and "Rows" in reason


@pytest.mark.parametrize("path", ["rest", "stow", "import"])
def test_explicit_big_endian_with_undefined_length_sequences_is_read(
    env: dict[str, Any], path: str
) -> None:
    """Issue 15 item 7's shape as pydicom writes it: Explicit VR Big Endian, a sequence and
    its item of undefined length. Read and stored (the worker reads it the same way)."""
    ds = dcmread(io.BytesIO(_instance(None)))
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99TEST", "test"
    ds.ProcedureCodeSequence = Sequence([item])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    outcome, code, reason = SEND[path](env, buf.getvalue())
    assert outcome == "accepted", (outcome, code, reason)
    read = preprocess.read_dicom(buf.getvalue())
    assert read.ProcedureCodeSequence[0].CodeValue == "1"
    assert read.pixel_array.shape == (64, 64)


def test_answers_name_no_internal_parts_and_comments_end_at_a_word(env: dict[str, Any]) -> None:
    """Issue 15 item 8: STOW reasons named internal part numbers ("part-1"); the C-STORE
    ErrorComment was cut at 64 characters in the middle of a number."""
    body = (f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{BOUNDARY}--\r\n").encode()
    r = env["client"].post(
        "/dicomweb/studies",
        content=body,
        headers={
            **_headers(env["key"]),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        },
    )
    assert r.status_code == 409
    assert "part-" not in r.headers["warning"] and "text/plain" in r.headers["warning"]
    comment = dimse._status(0xA900, "pixel data of 8192 bytes is shorter than 123456 bytes")
    text = str(comment.ErrorComment)
    assert len(text) <= 64 and text.split()[-1] in [
        "pixel",
        "data",
        "of",
        "8192",
        "bytes",
        "is",
        "shorter",
    ]
    long = "x " * 25 + "declared 1234567890"
    cut = str(dimse._status(0xA900, long).ErrorComment)
    assert len(cut) <= 64 and not cut.endswith(("1", "2", "3", "4"))


def test_other_pixels_in_implicit_vr_are_a_conflict_too(env: dict[str, Any]) -> None:
    """Native little-endian syntaxes hold the same pixel bytes, so a re-encoded instance is
    compared by content: the same image is a duplicate, another image a conflict."""
    study_uid, sop_uid = generate_uid(), generate_uid()
    assert _rest(env, _instance(study_uid, sop_uid=sop_uid))[0] == "accepted"

    def implicit(data: bytes) -> bytes:
        ds = dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2")
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
        return buf.getvalue()

    same = implicit(_instance(study_uid, sop_uid=sop_uid))
    assert _rest(env, same)[0] == "duplicate"
    other = implicit(_instance(study_uid, index=1, sop_uid=sop_uid))
    assert _rest(env, other)[:2] == ("rejected", ingest.SOP)


@pytest.mark.parametrize("target", ["<script>x", "1.02.3", "1..2"])
def test_stow_target_study_uid_follows_the_ui_rules(env: dict[str, Any], target: str) -> None:
    r = env["client"].post(
        f"/dicomweb/studies/{target}",
        content=b"--b\r\n\r\n--b--\r\n",
        headers={
            **_headers(env["key"]),
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        },
    )
    assert r.status_code == 400, r.text
    assert target not in r.text and "StudyInstanceUID" in r.text


def test_generated_spellings_of_one_patient_match_and_other_patients_do_not() -> None:
    """Seeded variations senders produce for the same person (case, trailing empty name
    components, padding) keep one patient; another ID, name or birth date is another."""
    rng = random.Random(FUZZ_SEED + 2)
    tenant = str(uuid.uuid4())
    for _ in range(300):
        family = "".join(rng.choice("ABCDEFGHIJ") for _ in range(rng.randint(2, 8)))
        given = "".join(rng.choice("KLMNOPQRST") for _ in range(rng.randint(2, 8)))
        pid = f"P{rng.randint(1, 10**6)}"
        birth = f"19{rng.randint(10, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}"
        base = {"PatientID": pid, "PatientName": f"{family}^{given}", "PatientBirthDate": birth}
        variant = dict(base)
        spelling = rng.choice([str.lower, str.upper, str.title])
        variant["PatientName"] = spelling(f"{family}^{given}") + "^" * rng.randint(0, 3)
        variant["PatientID"] = pid + " " * rng.randint(0, 1)
        keys = ingest_rules.patient_keys(_Tags(base), tenant)
        assert ingest_rules.patient_keys(_Tags(variant), tenant) == keys, (base, variant)
        for keyword, other in (
            ("PatientID", pid + "9"),
            ("PatientName", f"{given}^{family}"),
            ("PatientBirthDate", birth[:-1] + str((int(birth[-1]) + 1) % 10)),
        ):
            changed = ingest_rules.patient_keys(_Tags({**base, keyword: other}), tenant)
            assert changed != keys, keyword
        # Scoped per tenant: equal values in another tenant give other digests.
        assert ingest_rules.patient_keys(_Tags(base), str(uuid.uuid4())) != keys


class _Tags(dict[str, str]):
    """Enough of a Dataset for patient_keys: ``get`` by keyword."""
