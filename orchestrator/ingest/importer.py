"""Batch import: a folder tree or a zip of DICOM files into one tenant, straight to the
database, object store and queue (``medtriage import PATH``).

Resumable: an instance the tenant already holds is recognised from its header alone (pixel
data is not read) and counted as a duplicate, so re-running after an interruption imports
only the rest, and queues studies the interruption left unqueued. Each file's outcome is the
same as over the API: imported, duplicate, or rejected with a reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO
from uuid import UUID

from psycopg_pool import ConnectionPool
from redis import Redis

import preprocess
from orchestrator import lifecycle, metrics
from orchestrator.ingest import archive
from orchestrator.ingest import core as ingest
from orchestrator.store.db import studies as db
from orchestrator.store.db import translate_errors
from orchestrator.store.db.audit import record_upload
from orchestrator.store.db.keys import Principal, ensure_tenant
from orchestrator.store.objects import ObjectStore

# Studies that gained instances are queued every this many files (and at the end), so a
# long import starts processing early and an interruption leaves little unqueued.
QUEUE_EVERY_FILES = 200
# On a non-terminal stream, one progress line per this many files.
PROGRESS_EVERY_FILES = 100
PRINCIPAL = "cli:import"
# Large zip members are inflated to a temporary file in pieces of this size.
_COPY_BYTES = 1024 * 1024
# Files are hashed in pieces of this size (a resumed import compares them with what is stored).
HASH_CHUNK_BYTES = 1024 * 1024


@dataclass
class Summary:
    imported: int = 0
    duplicate: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    studies: set[UUID] = field(default_factory=set)

    def text(self) -> str:
        lines = [
            f"imported {self.imported}, duplicate {self.duplicate} (already stored), "
            f"rejected {len(self.rejected)}; {len(self.studies)} studies"
        ]
        lines += [f"  rejected {name}: {reason}" for name, reason in self.rejected]
        return "\n".join(lines)


@dataclass
class Source:
    """One candidate file: a path on disk or a zip member (read when needed)."""

    name: str
    read: Callable[[], bytes]
    path: Path | None = None
    # Set when the file cannot be read at all.
    problem: str | None = None
    # Large zip members: inflate to this file instead of reading into memory.
    extract: Callable[[Path], None] | None = None


def sources(root: Path, max_bytes: int) -> Iterator[Source]:
    """Every candidate under ``root`` in name order, zips opened (members in name order)."""
    base = root.parent if root.is_file() else root
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        name = str(path.relative_to(base))
        if path.name in archive.LITTER_NAMES or path.name.startswith("._"):
            continue
        if path.name == "DICOMDIR":  # an index of the files, not an instance
            continue
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
            size = path.stat().st_size
        except OSError as exc:
            yield Source(name, bytes, problem=f"unreadable file ({exc.strerror})")
            continue
        if magic not in (archive.ZIP_MAGIC, archive.EMPTY_ZIP_MAGIC):
            problem = f"over the {max_bytes}-byte file limit" if size > max_bytes else None
            yield Source(name, path.read_bytes, path, problem)
            continue
        yield from _zip_members(path, name, max_bytes)


def _zip_members(path: Path, name: str, max_bytes: int) -> Iterator[Source]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield Source(name, bytes, problem=f"not a readable zip archive ({exc})")
        return
    with zf:
        members = [info for info in zf.infolist() if not archive.skipped(info)]
        if len(members) > archive.DEFAULT_MAX_MEMBERS:
            # As over the API; each member read reopens the archive, so a huge one is slow too.
            problem = f"{len(members)} members exceed the limit of {archive.DEFAULT_MAX_MEMBERS}"
            yield Source(name, bytes, problem=f"{problem}; split the archive")
            return
        for info in sorted(members, key=lambda i: i.filename):
            member = f"{name}/{info.filename}"
            if info.flag_bits & 0x1:
                yield Source(member, bytes, problem="encrypted zip member")
            elif info.file_size > max_bytes:
                yield Source(member, bytes, problem=f"over the {max_bytes}-byte file limit")
            else:
                big = info.file_size > archive.TO_DISK_ABOVE_BYTES
                extract = _member_extractor(path, info.filename) if big else None
                yield Source(member, _member_reader(path, info.filename), extract=extract)


def _member_extractor(path: Path, member: str) -> Callable[[Path], None]:
    def extract(target: Path) -> None:
        with zipfile.ZipFile(path) as zf, zf.open(member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, _COPY_BYTES)

    return extract


def _member_reader(path: Path, member: str) -> Callable[[], bytes]:
    # Opened per read: sources are listed first, read later, one at a time.
    def read() -> bytes:
        # At most the declared size: zf.read() inflates a member that understates its size
        # in one call, up to 2 GiB, before the CRC check fails.
        with zipfile.ZipFile(path) as zf, zf.open(member) as src:
            return src.read(zf.getinfo(member).file_size)

    return read


def _stored_study(pool: ConnectionPool, tenant_id: UUID, source: BinaryIO | Path) -> UUID | None:
    """The study already holding this very file (same SOP instance, same bytes): a resumed
    import skips it unread. The same SOPInstanceUID with other bytes goes through the full
    ingest, which tells a duplicate from a conflict."""
    try:
        # Bounded like the full ingest (a deflate bomb is not inflated, junk not parsed for long).
        ds = preprocess.read_header(source, stop_before_pixels=True)
        study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - unreadable here: the full ingest says why
        return None
    if "\0" in study_uid + sop_uid:  # PostgreSQL text cannot hold NUL: the ingest refuses it
        return None
    with translate_errors(), pool.connection() as conn:
        found = db.stored_instance(conn, tenant_id=tenant_id, study_uid=study_uid, sop_uid=sop_uid)
    if found is None:
        return None
    study_id, sha256 = found
    return study_id if _sha256(source) == sha256 else None


def _sha256(source: BinaryIO | Path) -> str:
    h = hashlib.sha256()
    with source.open("rb") if isinstance(source, Path) else contextlib.nullcontext(source) as fh:
        fh.seek(0)
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class Progress:
    """A one-line progress bar on a terminal; a line per PROGRESS_EVERY_FILES otherwise."""

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream, self.total, self.started = stream, total, time.monotonic()
        self.tty = stream.isatty()

    def update(self, done: int, summary: Summary, *, final: bool = False) -> None:
        if not (self.tty or final or done % PROGRESS_EVERY_FILES == 0):
            return
        rate = done / max(time.monotonic() - self.started, 1e-6)
        line = (
            f"[{done}/{self.total}] imported {summary.imported}, duplicate {summary.duplicate},"
            f" rejected {len(summary.rejected)} ({rate:.0f} files/s)"
        )
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()


@dataclass
class _Run:
    pool: ConnectionPool
    store: ObjectStore
    redis: Redis
    queue_name: str
    principal: Principal
    max_pixels: int
    job_timeout_s: int
    priority: str | None
    summary: Summary = field(default_factory=Summary)
    # Studies touched since the last queueing, and whether they gained instances.
    pending: dict[UUID, bool] = field(default_factory=dict)
    # Every study of the run with its files by outcome (the run's audit rows).
    per_study: dict[UUID, dict[str, int]] = field(default_factory=dict)

    def one(self, source: Source) -> None:
        if source.problem is not None:
            self._reject(source.name, source.problem)
            return
        data: bytes | None = None
        try:
            if source.extract is not None:
                with tempfile.TemporaryDirectory(prefix="medtriage-import-") as spool:
                    target = Path(spool) / "member.dcm"
                    source.extract(target)
                    self.one(Source(source.name, source.read, target))
                return
            if source.path is None:
                data = source.read()
            study_id = _stored_study(
                self.pool,
                self.principal.tenant_id,
                source.path if source.path is not None else io.BytesIO(data or b""),
            )
            if study_id is not None:
                self._seen(study_id, ingest.DUPLICATE)
                self.summary.duplicate += 1
                metrics.observe_upload("import", ingest.DUPLICATE, 0)
                return
            # Files on disk go as paths: large ones are streamed, never read whole.
            content: bytes | Path = source.path if source.path is not None else data or b""
            size = len(content) if isinstance(content, bytes) else content.stat().st_size
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            self._reject(source.name, f"unreadable ({exc})")
            return
        try:
            outcome = ingest.ingest_file(
                self.pool,
                self.store,
                self.principal,
                source.name,
                content,
                max_pixels=self.max_pixels,
                priority=self.priority,
                source="import",
            )
        except OSError as exc:  # the file went away or became unreadable meanwhile
            self._reject(source.name, f"unreadable ({exc})")
            return
        metrics.observe_upload("import", outcome.outcome, size)
        if outcome.outcome == ingest.REJECTED:
            self.summary.rejected.append((source.name, outcome.reason or "rejected"))
            return
        assert outcome.study_id is not None
        if outcome.outcome == ingest.ACCEPTED:
            self.summary.imported += 1
        else:
            self.summary.duplicate += 1
        self._seen(outcome.study_id, outcome.outcome)

    def _reject(self, name: str, reason: str) -> None:
        self.summary.rejected.append((name, reason))
        metrics.observe_upload("import", ingest.REJECTED, 0)

    def _seen(self, study_id: UUID, outcome: str) -> None:
        self.summary.studies.add(study_id)
        new = outcome == ingest.ACCEPTED
        self.pending[study_id] = self.pending.get(study_id, False) or new
        counts = self.per_study.setdefault(study_id, {})
        counts[outcome] = counts.get(outcome, 0) + 1

    def queue(self) -> None:
        """Queue studies that gained instances, and those an earlier, interrupted import
        stored but never queued (still 'received')."""
        for study_id, new in self.pending.items():
            if not new:
                with translate_errors(), self.pool.connection() as conn:
                    row = db.get_study(conn, study_id, tenant_id=self.principal.tenant_id)
                if row is None or row["status"] != lifecycle.StudyStatus.RECEIVED.value:
                    continue
            lifecycle.queue(
                self.pool, self.redis, self.queue_name, study_id, job_timeout_s=self.job_timeout_s
            )
        self.pending.clear()


def run(
    pool: ConnectionPool,
    store: ObjectStore,
    redis: Redis,
    queue_name: str,
    *,
    root: Path,
    tenant: str,
    max_pixels: int,
    max_bytes: int,
    job_timeout_s: int,
    priority: str | None = None,
    progress: TextIO = sys.stderr,
) -> Summary:
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    with translate_errors(), pool.connection() as conn:
        tenant_id = ensure_tenant(conn, tenant)
        conn.commit()
    principal = Principal(
        key_id=uuid.uuid4(), tenant_id=tenant_id, name=PRINCIPAL, role="uploader", kind="service"
    )
    state = _Run(pool, store, redis, queue_name, principal, max_pixels, job_timeout_s, priority)
    items = list(sources(root, max_bytes))
    bar = Progress(progress, len(items))
    for done, source in enumerate(items, start=1):
        state.one(source)
        if done % QUEUE_EVERY_FILES == 0:
            state.queue()
        bar.update(done, state.summary)
    state.queue()
    bar.update(len(items), state.summary, final=True)
    summary = state.summary
    with translate_errors(), pool.connection() as conn:
        record_upload(
            conn,
            studies=state.per_study,
            tenant_id=tenant_id,
            principal=PRINCIPAL,
            action="study.import",
            request_id=uuid.uuid4().hex,
            detail={
                "imported": summary.imported,
                "duplicate": summary.duplicate,
                "rejected": len(summary.rejected),
            },
        )
        conn.commit()
    return summary
