"""Accepting DICOM files: validate, store the original, record rows, queue the study.

Shared by every ingest path. Per file the outcome is ``accepted``, ``duplicate`` or
``rejected`` with a reason (which never repeats the file name: the outcome carries it). Nothing is half-stored: the files of one request that pass the
checks are recorded in one transaction, each object written before it commits, and every
object it wrote is deleted again if it fails (the client's retry then stores them all).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool
from pydicom.uid import UID
from redis import Redis

import preprocess
from orchestrator import lifecycle, metrics
from orchestrator.ingest import rules as ingest_rules
from orchestrator.store.db import arrivals, translate_errors
from orchestrator.store.db import studies as db
from orchestrator.store.db.audit import record as record_audit
from orchestrator.store.db.keys import Principal
from orchestrator.store.objects import ObjectStore, original_key

log = logging.getLogger(__name__)

ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"
# Ingest conflicts (refused, counted in metrics.INGEST_CONFLICTS, audited as
# 'ingest.conflict'): another patient's instance claiming a study, and a SOPInstanceUID
# already stored with other content.
PATIENT, SOP = "patient_mismatch", "instance_conflict"
# Native little-endian syntaxes hold the same pixel bytes (a C-STORE peer may re-encode an
# Explicit VR file as Implicit VR): their content digests compare.
_LITTLE_ENDIAN_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_CONFLICT_REASONS = {
    PATIENT: "patient mismatch: the study holds another patient's instances (PatientID, "
    "or PatientName and PatientBirthDate, differ); not stored: check the sender's patient "
    "matching or give this study its own StudyInstanceUID",
    SOP: "conflict: SOPInstanceUID already stored with other content (SOP class or pixel "
    "data); the original is kept: send the new object under a new SOPInstanceUID",
}
# Files spooled to disk above this size are validated from their header and streamed to the
# store, never read whole into memory; smaller ones are simply read.
STREAM_ABOVE_BYTES = 16 * 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024
# Element values above this size are left on disk while the header is checked.
DEFER_BYTES = 64 * 1024
# Priority (0040,1003) RequestedProcedurePriority / (0000,0700) values that mean STAT.
_STAT_VALUES = {"STAT", "HIGH"}


@dataclass
class FileOutcome:
    filename: str
    outcome: str
    reason: str | None = None
    category: str | None = None
    study_id: UUID | None = None
    instance_id: UUID | None = None
    # What the file said it was, when it could be read (STOW-RS and C-STORE answer with these).
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"filename": self.filename, "outcome": self.outcome}
        if self.sop_instance_uid:
            out["sop_instance_uid"] = self.sop_instance_uid
        if self.reason:
            out["reason"] = self.reason
            out["category"] = self.category
        if self.study_id:
            out["study_id"] = str(self.study_id)
        if self.instance_id:
            out["instance_id"] = str(self.instance_id)
        return out


@dataclass
class IngestResult:
    files: list[FileOutcome] = field(default_factory=list)
    # Studies touched, in first-seen order, with whether new instances arrived.
    studies: dict[UUID, bool] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(f.outcome == ACCEPTED for f in self.files)


def _study_priority(ds: Any, requested: str | None) -> str:
    if requested in ("stat", "routine"):
        return requested
    for keyword in ("RequestedProcedurePriority", "Priority"):
        value = str(ds.get(keyword, "") or "").upper()
        if value in _STAT_VALUES:
            return "stat"
    return "routine"


@dataclass
class _Checked:
    """A file that passed every check: what its rows need."""

    filename: str
    data: bytes | Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    priority: str
    # Keyed digests of the patient (ingest_rules.patient_keys) and of the content.
    patient_id_key: str | None
    patient_demo_key: str | None
    content_key: str


def _check(
    filename: str,
    data: bytes | Path,
    *,
    max_pixels: int,
    priority: str | None,
    expect_study_uid: str | None,
    tenant_id: str,
) -> _Checked | FileOutcome:
    """Parse and validate one file; the refusal (a FileOutcome) when it cannot be accepted.
    A spooled file is read whole only while it is checked (small ones) and stays on disk
    until it is stored, so a request's many spooled files are never all in memory at once."""
    content = data
    if isinstance(data, Path) and data.stat().st_size <= STREAM_ABOVE_BYTES:
        content = data.read_bytes()
    try:
        ds = preprocess.read_dicom(content) if isinstance(content, bytes) else _read_header(content)
    except preprocess.PreprocessError as exc:
        return FileOutcome(filename, REJECTED, str(exc), exc.category)
    try:
        # For the answer (STOW-RS, C-STORE) only when they are UIDs: a refusal never echoes
        # free text, markup or a NUL back.
        sop_class_uid = str(ds.get("SOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        sop_class_uid = "" if ingest_rules.uid_problem(sop_class_uid) else sop_class_uid
        sop_uid = "" if ingest_rules.uid_problem(sop_uid) else sop_uid
    except Exception as exc:  # noqa: BLE001 - pydicom parses values lazily; corrupt ones raise
        return FileOutcome(
            filename, REJECTED, f"unreadable header ({type(exc).__name__})", "malformed"
        )

    def refuse(reason: str, category: str) -> FileOutcome:
        return FileOutcome(
            filename,
            REJECTED,
            reason,
            category,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_uid,
        )

    try:
        preprocess.check_image(ds, max_pixels=max_pixels)
        study_uid, series_uid, sop_uid, sop_class_uid = ingest_rules.check_uids(ds)
        syntax = ingest_rules.transfer_syntax(ds)
        modality = ingest_rules.modality(ds)
        ingest_rules.check_photometric(ds)
        _check_complete(ds, content)
        id_key, demo_key = ingest_rules.patient_keys(ds, tenant_id)
        checked = _Checked(
            filename=filename,
            data=data,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=syntax,
            modality=modality,
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            priority=_study_priority(ds, priority),
            patient_id_key=id_key,
            patient_demo_key=demo_key,
            content_key=ingest_rules.content_key(ds, sop_class_uid, content),
        )
    except preprocess.PreprocessError as exc:
        return refuse(str(exc), exc.category)
    except ingest_rules.RuleError as exc:
        return refuse(str(exc), exc.category)
    except Exception as exc:  # noqa: BLE001 - pydicom converts values lazily; corrupt ones raise
        # The type only: the message of a failed conversion quotes the value.
        return refuse(f"unreadable header ({type(exc).__name__})", "malformed")
    if expect_study_uid is not None and study_uid != expect_study_uid:
        return refuse(
            f"StudyInstanceUID {study_uid} does not match the study in the "
            f"request URL ({expect_study_uid})",
            "study_mismatch",
        )
    return checked


def _same_content(f: _Checked, stored: tuple[str, str | None, str | None]) -> bool:
    """Whether a SOP instance already stored holds what ``f`` holds. Rows stored before
    content digests existed, and the same instance in another transfer syntax whose pixel
    data is encoded differently (compressed), are compared by SOP class alone: decoding both
    to compare is the worker's work, and the original is kept either way."""
    sop_class, syntax, content = stored
    if sop_class != f.sop_class_uid:
        return False
    comparable = {syntax or "", f.transfer_syntax_uid}
    if content is None or not (len(comparable) == 1 or comparable <= _LITTLE_ENDIAN_NATIVE):
        return True
    return content == f.content_key


def _patient_conflict(conn: Any, study_id: UUID, f: _Checked) -> bool:
    """Whether ``f`` names another patient than the study's instances so far: another
    (0010,0020) PatientID, or another (0010,0010) PatientName + (0010,0030) PatientBirthDate.
    The study's row stays locked until the transaction ends (a concurrent upload of another
    patient's instance waits, then sees these)."""
    id_key, demo_key = db.claim_patient(
        conn, study_id, id_key=f.patient_id_key, demo_key=f.patient_demo_key
    )
    return bool(
        (id_key and f.patient_id_key and id_key != f.patient_id_key)
        or (demo_key and f.patient_demo_key and demo_key != f.patient_demo_key)
    )


def _conflict(
    conn: Any, principal: Principal, source: str, study_id: UUID, f: _Checked, kind: str
) -> FileOutcome:
    """A refusal for an ingest conflict, counted and written to the audit log for operators
    (``GET /v1/audit?action=ingest.conflict``). Neither names a patient value."""
    reason = _CONFLICT_REASONS[kind]
    record_audit(
        conn,
        tenant_id=principal.tenant_id,
        principal_id=principal.key_id if principal.kind == "key" else None,
        principal=principal.name,
        action="ingest.conflict",
        resource_type="study",
        resource_id=str(study_id),
        outcome="rejected",
        detail={"kind": kind, "ingest_path": source, "sop_instance_uid": f.sop_uid},
    )
    return FileOutcome(f.filename, REJECTED, reason, kind, None, None, f.sop_class_uid, f.sop_uid)


def _record(
    pool: ConnectionPool,
    store: ObjectStore,
    principal: Principal,
    files: list[_Checked],
    source: str,
) -> list[FileOutcome]:
    """Store the originals and record their rows, all in one transaction: it commits every
    file or none, and on failure every object it wrote is deleted again. One transaction per
    request rather than per file (a 32-slice series was 32 commits)."""
    outcomes: list[FileOutcome] = []
    written: list[str] = []
    study_ids: dict[str, UUID] = {}
    series_ids: dict[tuple[UUID, str], UUID] = {}
    with translate_errors(), pool.connection() as conn:
        try:
            for f in files:
                study_id = study_ids.get(f.study_uid)
                if study_id is None:
                    study_id = study_ids[f.study_uid] = lifecycle.receive(
                        conn,
                        tenant_id=principal.tenant_id,
                        study_uid=f.study_uid,
                        priority=f.priority,
                        # Only API keys have an api_keys row; people and services are audited.
                        created_by=principal.key_id if principal.kind == "key" else None,
                    )
                duplicate = FileOutcome(
                    f.filename, DUPLICATE, None, None, study_id, None, f.sop_class_uid, f.sop_uid
                )
                if _patient_conflict(conn, study_id, f):
                    outcomes.append(_conflict(conn, principal, source, study_id, f, PATIENT))
                    continue
                stored = db.stored_content(conn, study_id=study_id, sop_uid=f.sop_uid)
                if stored is not None:
                    same = _same_content(f, stored)
                    outcomes.append(
                        duplicate if same else _conflict(conn, principal, source, study_id, f, SOP)
                    )
                    continue
                instance_id = uuid.uuid4()
                key = original_key(str(principal.tenant_id), str(study_id), str(instance_id))
                size, digest = _put_original(store, key, f.data)
                written.append(key)
                series_id = series_ids.get((study_id, f.series_uid))
                if series_id is None:
                    series_id = series_ids[(study_id, f.series_uid)] = db.upsert_series(
                        conn, study_id=study_id, series_uid=f.series_uid, modality=f.modality
                    )
                inserted = db.insert_instance(
                    conn,
                    id=instance_id,
                    study_id=study_id,
                    series_id=series_id,
                    sop_uid=f.sop_uid,
                    sop_class_uid=f.sop_class_uid,
                    transfer_syntax_uid=f.transfer_syntax_uid,
                    rows=f.rows,
                    columns=f.columns,
                    frames=f.frames,
                    object_key=key,
                    size_bytes=size,
                    sha256=digest,
                    content_sha256=f.content_key,
                )
                if not inserted:  # lost a race with the same instance arriving concurrently
                    store.delete(key)
                    written.remove(key)
                    stored = db.stored_content(conn, study_id=study_id, sop_uid=f.sop_uid)
                    same = stored is None or _same_content(f, stored)
                    outcomes.append(
                        duplicate if same else _conflict(conn, principal, source, study_id, f, SOP)
                    )
                    continue
                outcomes.append(
                    FileOutcome(
                        f.filename,
                        ACCEPTED,
                        None,
                        None,
                        study_id,
                        instance_id,
                        f.sop_class_uid,
                        f.sop_uid,
                    )
                )
            conn.commit()
        except BaseException:
            # The rollback fails too when the database itself went away: delete regardless.
            try:
                conn.rollback()
            finally:
                for key in written:
                    store.delete(key)
            raise
    for outcome in outcomes:
        if outcome.category in _CONFLICT_REASONS:
            metrics.observe_ingest_conflict(source, outcome.category)
    return outcomes


def ingest_file(
    pool: ConnectionPool,
    store: ObjectStore,
    principal: Principal,
    filename: str,
    data: bytes | Path,
    *,
    max_pixels: int,
    priority: str | None,
    expect_study_uid: str | None = None,
    source: str = "rest",
) -> FileOutcome:
    """One file (bytes, or a spooled file on disk: large ones are streamed to the store).
    ``source`` is the ingest path (metrics.INGEST_PATHS)."""
    checked = _check(
        filename,
        data,
        max_pixels=max_pixels,
        priority=priority,
        expect_study_uid=expect_study_uid,
        tenant_id=str(principal.tenant_id),
    )
    if isinstance(checked, FileOutcome):
        return checked
    return _record(pool, store, principal, [checked], source)[0]


def _check_complete(ds: Any, data: bytes | Path) -> None:
    """Refuse uncompressed pixel data (7FE0,0010) shorter than (0028,0010) Rows x (0028,0011)
    Columns x (0028,0008) NumberOfFrames x (0028,0002) SamplesPerPixel x (0028,0100)
    BitsAllocated declare: a truncated transfer fails here, not later in a worker."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not isinstance(syntax, UID) or not syntax.is_transfer_syntax:
        return  # unknown or private: the decoder says whether it can read it
    if syntax.is_compressed or "PixelData" not in ds:
        return
    try:
        bits = int(ds.BitsAllocated)
        count = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
        count *= int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return  # check_image and the decoder report missing or odd image tags
    expected = (count * bits + 7) // 8
    element = ds.get_item("PixelData", keep_deferred=True)
    declared = getattr(element, "length", None)
    if isinstance(data, Path) and getattr(element, "value", b"") is None:
        # Deferred (left on disk): its declared length, and what the file really holds.
        present = min(element.length, data.stat().st_size - element.value_tell)
    else:
        present = len(ds.PixelData or b"")
    if present >= expected:
        return
    if isinstance(declared, int) and declared != 0xFFFFFFFF and present < declared:
        raise preprocess.TruncatedError(
            f"the file ends inside its pixel data ({present} of {declared} bytes): it is "
            "truncated; send it again"
        )
    # Whole as declared, yet short of what the image tags need: no resend would help.
    raise preprocess.MalformedImageError(
        f"pixel data of {present} bytes is shorter than the {expected} bytes (0028,0010) Rows x "
        "(0028,0011) Columns x frames x samples x (0028,0100) BitsAllocated declare for "
        f"uncompressed {syntax.name}: fix the image tags or the (0002,0010) TransferSyntaxUID"
    )


def _read_header(path: Path) -> Any:
    """A large file's dataset with its big values (pixel data) left on disk until read."""
    return preprocess.read_header(path, defer_size=DEFER_BYTES)


def _put_original(store: ObjectStore, key: str, data: bytes | Path) -> tuple[int, str]:
    """Store the original; its size and SHA-256 (computed while streaming a file)."""
    if isinstance(data, bytes):
        store.put(key, data, content_type="application/dicom")
        return len(data), hashlib.sha256(data).hexdigest()
    sha = hashlib.sha256()
    size = 0

    def chunks() -> Iterator[bytes]:
        nonlocal size
        with data.open("rb") as fh:
            while chunk := fh.read(STREAM_CHUNK_BYTES):
                sha.update(chunk)
                size += len(chunk)
                yield chunk

    store.put_stream(key, chunks(), content_type="application/dicom")
    return size, sha.hexdigest()


def ingest(
    pool: ConnectionPool,
    store: ObjectStore,
    redis: Redis,
    queue_name: str,
    principal: Principal,
    files: Sequence[tuple[str, bytes | Path]],
    *,
    max_pixels: int,
    job_timeout_s: int,
    priority: str | None = None,
    expect_study_uid: str | None = None,
    arrival: tuple[str, bool] | None = None,
) -> IngestResult:
    """Ingest each file and queue the studies that gained instances. With
    ``expect_study_uid`` (STOW-RS to /studies/{uid}) instances of other studies are refused.
    With ``arrival`` = (source, complete) the studies are not queued here but left to the
    arrivals sweeper (queued when stable, or at once when complete)."""
    result = IngestResult()
    slots: list[FileOutcome | None] = []
    accepted: list[_Checked] = []
    for filename, data in files:
        checked = _check(
            filename,
            data,
            max_pixels=max_pixels,
            priority=priority,
            expect_study_uid=expect_study_uid,
            tenant_id=str(principal.tenant_id),
        )
        if isinstance(checked, FileOutcome):
            slots.append(checked)
        else:
            slots.append(None)
            accepted.append(checked)
    source = arrival[0] if arrival is not None else "rest"
    recorded = iter(_record(pool, store, principal, accepted, source) if accepted else [])
    for slot in slots:
        outcome = slot if slot is not None else next(recorded)
        result.files.append(outcome)
        if outcome.study_id is not None:
            new = outcome.outcome == ACCEPTED
            result.studies[outcome.study_id] = result.studies.get(outcome.study_id, False) or new
    for study_id, has_new in result.studies.items():
        if not has_new:
            if arrival is not None and arrival[1]:
                _complete_if_waiting(pool, study_id)  # "complete" sent with a retried instance
            continue
        if arrival is None:
            lifecycle.queue(pool, redis, queue_name, study_id, job_timeout_s=job_timeout_s)
            continue
        count = sum(f.study_id == study_id and f.outcome == ACCEPTED for f in result.files)
        record_arrival(pool, study_id, source=arrival[0], instances=count, complete=arrival[1])
    return result


def _complete_if_waiting(pool: ConnectionPool, study_id: UUID) -> None:
    with translate_errors(), pool.connection() as conn:
        if arrivals.waiting(conn, study_id):
            arrivals.record(conn, study_id=study_id, source="stow", instances=0, complete=True)


def record_arrival(
    pool: ConnectionPool, study_id: UUID, *, source: str, instances: int, complete: bool
) -> None:
    with translate_errors(), pool.connection() as conn:
        arrivals.record(
            conn, study_id=study_id, source=source, instances=instances, complete=complete
        )
