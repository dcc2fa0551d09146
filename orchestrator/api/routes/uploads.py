"""What every HTTP upload path shares: bounded body reads, the REST body forms (multipart,
zip, raw ``application/dicom``) and Idempotency-Key replay.

Idempotency follows the IETF ``Idempotency-Key`` header draft: the first answer (success
or a 4xx about the content) is stored per tenant and key and returned to retries with
``Idempotent-Replayed: true``; the same key with different content is 422; a retry while
the first request is still running is 409. A 5xx is not stored, so a retry runs again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from orchestrator.api.deps import Services
from orchestrator.errors import (
    BadRequest,
    Conflict,
    Gone,
    InvalidUpload,
    MedtriageError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from orchestrator.ingest import archive
from orchestrator.ingest.core import REJECTED, STREAM_ABOVE_BYTES, FileOutcome
from orchestrator.store.db import idempotency, translate_errors
from orchestrator.store.db.keys import Principal

ZIP_TYPES = {"application/zip", "application/x-zip-compressed"}
DICOM_TYPE = "application/dicom"
FORM_TYPE = "multipart/form-data"
# Printable ASCII without spaces at the ends, as the draft's sf-string allows.
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$")
# How long a claimed key waits for its first request's answer before a retry may take over.
IDEMPOTENCY_PENDING_TIMEOUT_S = 300
REPLAYED_HEADER = "Idempotent-Replayed"

# A file's content in memory, or spooled to disk (large bodies never sit in memory whole).
Content = bytes | Path
Payload = list[tuple[str, Content]]
# Request bodies are copied to disk in pieces of this size.
SPOOL_CHUNK_BYTES = 1024 * 1024
# Form files are handed on from memory up to this many bytes per request (the rest are
# spooled to disk, so a request's memory stays bounded however many files it carries).
IN_MEMORY_UPLOAD_BYTES = 32 * 1024 * 1024


def media_type(request: Request) -> tuple[str, dict[str, str]]:
    """The Content-Type's essence (lower case) and its parameters (quotes removed)."""
    header = request.headers.get("content-type", "")
    essence, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for piece in rest.split(";"):
        name, eq, value = piece.partition("=")
        if eq:
            params[name.strip().lower()] = value.strip().strip('"')
    return essence.strip().lower(), params


async def spool_body(request: Request, limit: int, path: Path) -> int:
    """Copy the body to ``path`` as it arrives; 413 as soon as it passes ``limit``."""
    size = 0
    with path.open("wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
            fh.write(chunk)
    return size


async def _spool_upload(upload: UploadFile, path: Path, budget: list[int]) -> Content:
    """A form file's content: as bytes while the request's in-memory budget lasts and the file
    is one ingest would read whole anyway (``ingest.STREAM_ABOVE_BYTES``), else copied to
    ``path``. Copying a file to disk only to read it back cost a 10 MB radiograph's upload
    more than storing it."""
    size = upload.size
    if size is not None and size <= min(budget[0], STREAM_ABOVE_BYTES):
        budget[0] -= size
        return await upload.read()
    with path.open("wb") as fh:
        while chunk := await upload.read(SPOOL_CHUNK_BYTES):
            fh.write(chunk)
    return path


def size_of(content: Content) -> int:
    return len(content) if isinstance(content, bytes) else content.stat().st_size


def _head(content: Content) -> bytes:
    if isinstance(content, bytes):
        return content[:4]
    with content.open("rb") as fh:
        return fh.read(4)


def _filename(request: Request, default: str) -> str:
    disposition = request.headers.get("content-disposition", "")
    match = re.search(r'filename="?([^";]+)"?', disposition)
    return match.group(1) if match else default


def expand_zips(
    files: Payload, *, max_bytes: int, spool: Path | None = None
) -> tuple[Payload, list[FileOutcome]]:
    """Replace zip files by their members; unreadable members become rejected outcomes."""
    out: Payload = []
    rejected: list[FileOutcome] = []
    for name, data in files:
        if not archive.is_zip(_head(data)):
            out.append((name, data))
            continue
        unpacked = archive.unpack(data, name=name, max_bytes=max_bytes, spool=spool)
        out.extend(unpacked.files)
        rejected.extend(
            FileOutcome(member, REJECTED, reason, "archive") for member, reason in unpacked.rejected
        )
    return out, rejected


async def rest_payload(
    request: Request, files: list[UploadFile] | None, max_bytes: int, spool: Path
) -> tuple[Payload, list[FileOutcome]]:
    """The files of a ``POST /v1/studies`` body, whichever of the three forms it came in.
    DICOM bodies and form files are spooled to files under ``spool`` (the caller removes it)."""
    essence, _ = media_type(request)
    payload: Payload = []
    if essence == FORM_TYPE or not essence:
        if not files:
            raise BadRequest(
                "no files: send DICOM files (or a zip) as multipart/form-data fields named 'files'"
            )
        budget = [IN_MEMORY_UPLOAD_BYTES]
        for index, upload in enumerate(files):
            content = await _spool_upload(upload, spool / f"form-{index}", budget)
            payload.append((upload.filename or f"file-{index}", content))
    elif essence == DICOM_TYPE:
        path = spool / "body.dcm"
        if not await spool_body(request, max_bytes, path):
            raise BadRequest("empty application/dicom body: send one DICOM Part 10 file")
        payload.append((_filename(request, "body.dcm"), path))
    elif essence in ZIP_TYPES:
        path = spool / "body.zip"
        await spool_body(request, max_bytes, path)
        payload.append((_filename(request, "upload.zip"), path))
        if not archive.is_zip(_head(path)):
            raise BadRequest(f"body sent as {essence} is not a zip archive")
    else:
        raise UnsupportedMediaType(
            f"Content-Type {essence or '(none)'!r} is not accepted here: send "
            "multipart/form-data (fields 'files'), application/zip or application/dicom"
        )
    # Unpacking zips is blocking work: off the event loop.
    return await run_in_threadpool(expand_zips, payload, max_bytes=max_bytes, spool=spool)


def digest(payload: Payload, *extra: str | None) -> str:
    """What makes two requests 'the same' for idempotency: their files and options, not
    their framing (multipart boundaries differ between retries)."""
    h = hashlib.sha256()
    for value in extra:
        h.update(f"{value}\0".encode())
    for name, data in payload:
        h.update(name.encode() + b"\0" + _sha256(data))
    return h.hexdigest()


def _sha256(content: Content) -> bytes:
    if isinstance(content, bytes):
        return hashlib.sha256(content).digest()
    sha = hashlib.sha256()
    with content.open("rb") as fh:
        while chunk := fh.read(SPOOL_CHUNK_BYTES):
            sha.update(chunk)
    return sha.digest()


def idempotent(
    request: Request,
    services: Services,
    principal: Principal,
    *,
    route: str,
    request_sha256: Callable[[], str],
    answer: Callable[[], JSONResponse],
) -> JSONResponse:
    """Run ``answer`` once per Idempotency-Key; without the header, just run it."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return answer()
    if not _KEY_PATTERN.match(key):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    settings = services.settings
    fingerprint = request_sha256()  # only now: hashing a large upload costs a pass over it
    with translate_errors(), services.pool.connection() as conn:
        claim = idempotency.claim(
            conn,
            tenant_id=principal.tenant_id,
            key=key,
            route=route,
            request_sha256=fingerprint,
            ttl_s=settings.idempotency_ttl_s,
            pending_timeout_s=IDEMPOTENCY_PENDING_TIMEOUT_S,
        )
    if not claim.owner:
        if idempotency.purged(claim):
            raise Gone(idempotency.PURGED_DETAIL)
        if claim.route != route or claim.request_sha256 != fingerprint:
            raise InvalidUpload(
                "this Idempotency-Key was used for a different request; use a new key for "
                "new content"
            )
        if claim.status_code is None:
            raise Conflict(
                "the first request with this Idempotency-Key is still being processed; "
                "retry shortly"
            )
        return JSONResponse(
            status_code=claim.status_code,
            content=claim.response,
            headers={REPLAYED_HEADER: "true"},
        )
    try:
        response = answer()
    except MedtriageError as exc:
        if exc.http_status >= 500:
            _release(services, principal, key)
        else:
            body: dict[str, Any] = {"error": type(exc).__name__, "detail": exc.message}
            _complete(services, principal, key, exc.http_status, body)
        raise
    except BaseException:
        _release(services, principal, key)
        raise
    _complete(services, principal, key, response.status_code, _json(response))
    return response


def _json(response: JSONResponse) -> Any:
    return json.loads(bytes(response.body))


def _complete(services: Services, principal: Principal, key: str, status: int, body: Any) -> None:
    with translate_errors(), services.pool.connection() as conn:
        idempotency.complete(
            conn, tenant_id=principal.tenant_id, key=key, status_code=status, response=body
        )


def _release(services: Services, principal: Principal, key: str) -> None:
    with translate_errors(), services.pool.connection() as conn:
        idempotency.release(conn, tenant_id=principal.tenant_id, key=key)
