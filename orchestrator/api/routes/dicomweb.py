"""DICOMweb STOW-RS: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{uid}``.

The body is ``multipart/related; type="application/dicom"``, one DICOM Part 10 instance per
part. The answer is the Store Instances Response (PS3.18 §10.5.3) as ``application/dicom+json``
(or ``application/dicom+xml`` when the Accept header asks for it): 200 when every instance
was stored, 202 when some failed or were already stored (duplicates: referenced with the
WarningReason 0x0111 Duplicate SOP Instance), 409 when none could be stored. Each failure's
reason in words is also sent as a ``Warning: 299`` header, and one for the duplicates.

Instances of one study may come in several requests: the study is processed once none has
arrived for ``ingest_stable_age_s``, or at once when a request says ``?complete=true``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from orchestrator import metrics
from orchestrator.api.deps import ServicesDep, Uploader, audit_upload
from orchestrator.api.routes import uploads
from orchestrator.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from orchestrator.ingest import core as ingest
from orchestrator.ingest import rules as ingest_rules
from orchestrator.ingest import stow as dicomweb
from orchestrator.ingest.core import ACCEPTED, DUPLICATE, REJECTED, FileOutcome
from orchestrator.queue import backpressure
from orchestrator.store.db.keys import Principal

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

# At most this many Warning headers (one per failed instance) on a response.
_MAX_WARNINGS = 20


@router.post("/studies")
async def store_instances(request: Request, services: ServicesDep, principal: Uploader) -> Response:
    return await _store(request, services, principal, None)


@router.post("/studies/{study_instance_uid}")
async def store_study_instances(
    request: Request, services: ServicesDep, principal: Uploader, study_instance_uid: str
) -> Response:
    if problem := ingest_rules.uid_problem(study_instance_uid):
        # Not echoed: the path may hold markup or free text.
        raise BadRequest(f"the StudyInstanceUID in the path {problem}: not a valid UID")
    return await _store(request, services, principal, study_instance_uid)


def _wants_xml(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return dicomweb.DICOM_XML in accept and dicomweb.DICOM_JSON not in accept


async def _store(
    request: Request, services: ServicesDep, principal: Principal, study_uid: str | None
) -> Response:
    settings = services.settings
    length = int(request.headers.get("content-length") or 0)
    if length > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"request body of {length} bytes exceeds the {settings.max_upload_bytes}-byte limit"
        )
    essence, params = uploads.media_type(request)
    if essence != "multipart/related":
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="application/dicom", not {essence or "(none)"!r}'
        )
    part_type = params.get("type", uploads.DICOM_TYPE).lower()
    if part_type != uploads.DICOM_TYPE:
        raise UnsupportedMediaType(
            f"multipart/related type {part_type!r} is not supported: send DICOM Part 10 "
            'instances with type="application/dicom"'
        )
    backpressure.check_upload(
        request.app.state,
        services.redis,
        settings.queue_name,
        settings.max_queue_depth,
        settings.max_queue_age_s,
    )
    with tempfile.TemporaryDirectory(prefix="medtriage-stow-") as spool:
        body = Path(spool) / "body"
        size = await uploads.spool_body(request, settings.max_upload_bytes, body)
        if not size:
            raise BadRequest("empty body: send one DICOM instance per multipart/related part")

        def split_and_store() -> Response:
            with body.open("rb") as fh:
                parts = dicomweb.split_related(fh, params.get("boundary", ""))
                files, refused = _split_files(fh, parts, Path(spool))
            return _answer(request, services, principal, study_uid, files, refused)

        # Blocking work (splitting, parsing, storing, recording) off the event loop.
        return await run_in_threadpool(split_and_store)


def _split_files(
    fh: BinaryIO, parts: list[tuple[dict[str, str], int, int]], spool: Path
) -> tuple[uploads.Payload, list[tuple[int, FileOutcome]]]:
    """Each part as bytes, or copied to its own file when large (never all in memory)."""
    if not parts:
        raise BadRequest("multipart body holds no parts: send one DICOM instance per part")
    files: uploads.Payload = []
    refused: list[tuple[int, FileOutcome]] = []
    for index, (headers, start, end) in enumerate(parts):
        name = headers.get("content-location") or f"part-{index + 1}"
        ctype = headers.get("content-type", uploads.DICOM_TYPE).split(";")[0].strip().lower()
        if ctype != uploads.DICOM_TYPE:
            reason = f"part Content-Type {ctype!r} is not application/dicom"
            refused.append((index, FileOutcome(name, REJECTED, reason, "media_type")))
        elif end - start <= ingest.STREAM_ABOVE_BYTES:
            fh.seek(start)
            files.append((name, fh.read(end - start)))
        else:
            path = spool / f"part-{index}"
            fh.seek(start)
            with path.open("wb") as out:
                for offset in range(start, end, uploads.SPOOL_CHUNK_BYTES):
                    out.write(fh.read(min(end - offset, uploads.SPOOL_CHUNK_BYTES)))
            files.append((name, path))
    return files, refused


def _answer(
    request: Request,
    services: ServicesDep,
    principal: Principal,
    study_uid: str | None,
    files: uploads.Payload,
    refused: list[tuple[int, FileOutcome]],
) -> Response:
    settings = services.settings
    result = ingest.ingest(
        services.pool,
        services.store,
        services.redis,
        settings.queue_name,
        principal,
        files,
        max_pixels=settings.max_pixels,
        job_timeout_s=settings.job_timeout_s,
        expect_study_uid=study_uid,
        # Queued when the study has been stable for ingest_stable_age_s, or now with ?complete.
        arrival=("stow", request.query_params.get("complete", "").lower() in ("1", "true")),
    )
    for (_, data), outcome in zip(files, result.files, strict=True):
        metrics.observe_upload("stow", outcome.outcome, uploads.size_of(data))
    outcomes = list(result.files)
    for index, outcome in refused:
        metrics.observe_upload("stow", outcome.outcome, 0)
        outcomes.insert(index, outcome)
    failed = [o for o in outcomes if o.outcome == REJECTED]
    stored = len(outcomes) - len(failed)
    audit_upload(
        request,
        services,
        principal,
        action="study.stow",
        files=outcomes,
        detail={
            "accepted": sum(o.outcome == ACCEPTED for o in outcomes),
            "stored": stored,
            "failed": len(failed),
        },
    )
    duplicates = [o for o in outcomes if o.outcome == DUPLICATE]
    # PS3.18 10.5.3: 202 when some instances failed or carry warnings (already stored).
    status = 200 if not (failed or duplicates) else (202 if stored else 409)
    response = dicomweb.store_response(outcomes)
    warnings = [
        f'299 medtriage "{_header_text(o.reason or "refused")}"' for o in failed[:_MAX_WARNINGS]
    ]
    if duplicates:
        warnings.append(
            f'299 medtriage "{len(duplicates)} instance(s) already stored with the same '
            'content (duplicate): kept once"'
        )
    if _wants_xml(request):
        content, media = dicomweb.to_xml(response), dicomweb.DICOM_XML
    else:
        content, media = json.dumps(response.to_json_dict()).encode(), dicomweb.DICOM_JSON
    out = Response(content=content, status_code=status, media_type=media)
    for warning in warnings:
        out.headers.append("Warning", warning)
    return out


def _header_text(text: str) -> str:
    # Header values are latin-1 without control characters; quotes would end the warn-text.
    cleaned = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else " " for c in text)
    return cleaned[:300]
