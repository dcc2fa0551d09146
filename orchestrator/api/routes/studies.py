"""/v1/studies: upload, list, read a study, its previews and its report.

An upload is multipart/form-data (fields ``files``; a zip among them is unpacked), a zip
body (``application/zip``) or one raw ``application/dicom`` body; the answer lists every
file's outcome. ``Idempotency-Key`` makes a retried upload return the first answer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from orchestrator import metrics
from orchestrator.api.deps import Reader, ServicesDep, Uploader, audit, audit_upload
from orchestrator.api.routes import uploads
from orchestrator.errors import InvalidUpload, NotFound, PayloadTooLarge
from orchestrator.ingest import core as ingest
from orchestrator.queue import backpressure
from orchestrator.reports import CONTENT_TYPES, EXTENSIONS, regenerate
from orchestrator.store.db import studies as db
from orchestrator.store.db import translate_errors
from orchestrator.store.db.keys import Principal

router = APIRouter(prefix="/v1/studies", tags=["studies"])

DEFAULT_PAGE_SIZE = 50


class StudyCreated(BaseModel):
    id: str | None
    status: str | None
    studies: list[dict[str, Any]]
    files: list[dict[str, Any]]


class StudyPublic(BaseModel):
    id: str
    study_instance_uid: str
    status: str
    priority: str
    created_at: str
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    timings_ms: dict[str, float]
    instances: list[dict[str, Any]]
    review: dict[str, Any] | None
    reports: list[dict[str, Any]]


class StudySummary(BaseModel):
    id: str
    study_instance_uid: str
    status: str
    priority: str
    instance_count: int
    created_at: str
    finished_at: str | None


class StudiesPublic(BaseModel):
    items: list[StudySummary]
    total: int
    limit: int
    offset: int


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@router.post("", status_code=202, response_model=StudyCreated)
async def create_study(
    request: Request,
    services: ServicesDep,
    principal: Uploader,
    files: list[UploadFile] | None = None,
    priority: Annotated[str | None, Query(pattern="^(stat|routine)$")] = None,
) -> JSONResponse:
    settings = services.settings
    length = int(request.headers.get("content-length") or 0)
    if length > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"request body of {length} bytes exceeds the {settings.max_upload_bytes}-byte limit"
        )
    # Before reading or storing anything: refused uploads leave nothing behind.
    backpressure.check_upload(
        request.app.state,
        services.redis,
        settings.queue_name,
        settings.max_queue_depth,
        settings.max_queue_age_s,
    )
    with tempfile.TemporaryDirectory(prefix="medtriage-upload-") as spool:
        payload, rejected = await uploads.rest_payload(
            request, files, settings.max_upload_bytes, Path(spool)
        )
        # Parsing, storing and recording are blocking work: off the event loop, so one slow
        # upload does not stall every other request.
        return await run_in_threadpool(
            uploads.idempotent,
            request,
            services,
            principal,
            route="POST /v1/studies",
            request_sha256=lambda: uploads.digest(payload, priority, str(len(rejected))),
            answer=lambda: _create(request, services, principal, payload, rejected, priority),
        )


def _create(
    request: Request,
    services: ServicesDep,
    principal: Principal,
    payload: uploads.Payload,
    rejected: list[ingest.FileOutcome],
    priority: str | None,
) -> JSONResponse:
    settings = services.settings
    result = ingest.ingest(
        services.pool,
        services.store,
        services.redis,
        settings.queue_name,
        principal,
        payload,
        max_pixels=settings.max_pixels,
        job_timeout_s=settings.job_timeout_s,
        priority=priority,
    )
    for (_, data), outcome in zip(payload, result.files, strict=True):
        metrics.observe_upload("rest", outcome.outcome, uploads.size_of(data))
    for outcome in rejected:
        metrics.observe_upload("rest", outcome.outcome, 0)
    result.files.extend(rejected)
    body_files = [f.public() for f in result.files]
    studies = []
    with translate_errors(), services.pool.connection() as conn:
        for study_id in result.studies:
            row = db.get_study(conn, study_id, tenant_id=principal.tenant_id)
            if row is not None:
                studies.append({"id": str(study_id), "status": row["status"]})
        audit_upload(
            request,
            services,
            principal,
            action="study.upload",
            files=result.files,
            detail={"accepted": result.accepted, "files": len(result.files)},
            conn=conn,
        )
    if not studies:
        # The error shape with the per-file outcomes the other answers carry.
        return JSONResponse(
            status_code=InvalidUpload.http_status,
            content={
                "error": InvalidUpload.__name__,
                "detail": "no file was accepted: "
                + "; ".join(f"{f['filename']}: {f.get('reason')}" for f in body_files),
                "files": body_files,
            },
        )
    first = studies[0]
    content = StudyCreated(
        id=first["id"], status=first["status"], studies=studies, files=body_files
    )
    return JSONResponse(status_code=202, content=content.model_dump())


@router.get("", response_model=StudiesPublic)
def list_studies(
    request: Request,
    services: ServicesDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=200)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Annotated[
        str | None,
        Query(pattern="^(received|queued|processing|done|failed|needs_review|not_applicable)$"),
    ] = None,
) -> StudiesPublic:
    with translate_errors(), services.pool.connection() as conn:
        rows, total = db.list_studies(
            conn, tenant_id=principal.tenant_id, limit=limit, offset=offset, status=status
        )
    audit(
        request,
        services,
        principal,
        action="study.list",
        resource_type="study",
        resource_id=None,
        detail={"returned": len(rows)},
    )
    return StudiesPublic(
        items=[
            StudySummary(
                id=str(r["id"]),
                study_instance_uid=r["study_uid"],
                status=r["status"],
                priority=r["priority"],
                instance_count=int(r["instance_count"]),
                created_at=str(_iso(r["created_at"])),
                finished_at=_iso(r["finished_at"]),
            )
            for r in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
    )


def _load(services: ServicesDep, principal: Any, study_id: UUID) -> dict[str, Any]:
    with translate_errors(), services.pool.connection() as conn:
        row = db.get_study(conn, study_id, tenant_id=principal.tenant_id)
    if row is None:
        raise NotFound(f"study {study_id} not found")
    return row


@router.get("/{study_id}", response_model=StudyPublic)
def get_study(
    request: Request, services: ServicesDep, principal: Reader, study_id: UUID
) -> StudyPublic:
    study = _load(services, principal, study_id)
    with translate_errors(), services.pool.connection() as conn:
        rows = db.instances(conn, study_id)
        results = db.results(conn, study_id)
        review = db.review_case(conn, study_id)
        reports = db.reports(conn, study_id)
    audit(
        request,
        services,
        principal,
        action="study.read",
        resource_type="study",
        resource_id=str(study_id),
    )
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_instance.setdefault(str(r["instance_id"]), []).append(
            {
                "model": r["model"],
                "version": r["version"],
                "arm": r["arm"],
                "label": r["label"],
                "confidence": r["confidence"],
                "outputs": r["outputs"],
                "findings": r["findings"],
                "latency_ms": r["latency_ms"],
            }
        )
    return StudyPublic(
        id=str(study["id"]),
        study_instance_uid=study["study_uid"],
        status=study["status"],
        priority=study["priority"],
        created_at=str(_iso(study["created_at"])),
        queued_at=_iso(study["queued_at"]),
        started_at=_iso(study["started_at"]),
        finished_at=_iso(study["finished_at"]),
        error=study["error"],
        timings_ms=study["timings"],
        instances=[
            {
                "id": str(i["id"]),
                "series_instance_uid": i["series_uid"],
                "sop_instance_uid": i["sop_uid"],
                "modality": i["modality"],
                "rows": i["rows"],
                "columns": i["columns"],
                "frames": i["frames"],
                "status": i["status"],
                "error": i["error"],
                "warnings": list(i["warnings"]),
                "preview": f"/v1/studies/{study_id}/instances/{i['id']}/preview"
                if i["preview_key"]
                else None,
                "results": by_instance.get(str(i["id"]), []),
            }
            for i in rows
        ],
        review=None
        if review is None
        else {
            k: (_iso(v) if k == "created_at" else (str(v) if k == "id" else v))
            for k, v in review.items()
        },
        reports=[
            {"revision": r["revision"], "format": r["format"], "created_at": _iso(r["created_at"])}
            for r in reports
        ],
    )


@router.get("/{study_id}/instances/{instance_id}/preview")
def get_preview(
    request: Request, services: ServicesDep, principal: Reader, study_id: UUID, instance_id: UUID
) -> Response:
    _load(services, principal, study_id)
    with translate_errors(), services.pool.connection() as conn:
        key = db.preview_key(conn, study_id, instance_id)
    if key is None:
        raise NotFound(f"no preview for instance {instance_id}")
    data = services.store.get(key)
    audit(
        request,
        services,
        principal,
        action="preview.read",
        resource_type="instance",
        resource_id=str(instance_id),
    )
    return Response(content=data, media_type="image/jpeg")


@router.get("/{study_id}/report")
def get_report(
    request: Request,
    services: ServicesDep,
    principal: Reader,
    study_id: UUID,
    format: Annotated[str, Query(pattern="^(json|html|pdf|sr|sc)$")] = "json",
    revision: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """The newest (or the given) revision of the report as JSON, HTML, PDF, DICOM SR or a
    DICOM Secondary Capture of the previews with the findings drawn on them."""
    _load(services, principal, study_id)
    with translate_errors():
        data, number = regenerate.rendered(
            services.pool, services.store, study_id, format, revision=revision
        )
    audit(
        request,
        services,
        principal,
        action="report.read",
        resource_type="study",
        resource_id=str(study_id),
        detail={"revision": number, "format": format},
    )
    headers = {"X-Report-Revision": str(number)}
    if format in ("pdf", "sr", "sc"):
        name = f"report-{study_id}-r{number}.{EXTENSIONS[format]}"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return Response(content=data, media_type=CONTENT_TYPES[format], headers=headers)
