"""Report export to a PACS: the DICOM SR of a report revision over DICOMweb STOW-RS.

Targets are per tenant (``pacs_targets``: a name and the DICOMweb base URL); every attempt
is recorded in ``report_exports`` with the stored SOP Instance UID or the failure.
STOW-RS (PS3.18 §10.5): ``POST {base}/studies`` with ``multipart/related;
type="application/dicom"``; the answer's (0008,1199) ReferencedSOPSequence lists what was
stored, (0008,1198) FailedSOPSequence what was not.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import pydicom
from psycopg import Connection
from psycopg_pool import ConnectionPool

from orchestrator.errors import BadRequest, MedtriageError, NotFound
from orchestrator.reports import regenerate
from orchestrator.security.outbound import DestinationRefused, OutboundPolicy
from orchestrator.store.db import pacs as db
from orchestrator.store.objects import ObjectStore

# Deadline of one STOW-RS request (connect + upload + answer).
STOW_TIMEOUT_S = 30.0
_REFERENCED_SOP = "00081199"
_FAILED_SOP = "00081198"
_SOP_INSTANCE = "00081155"


class ExportFailed(MedtriageError):
    """The PACS refused the object or could not be reached."""

    http_status = 502


@dataclass(frozen=True)
class Export:
    target: str
    revision: int
    outcome: str
    sop_instance_uid: str | None
    detail: str | None


def add_target(
    conn: Connection, tenant_id: UUID, name: str, stow_url: str, *, allow_http: bool = False
) -> dict[str, Any]:
    parts = urlsplit(stow_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"stow_url must be an absolute http(s) DICOMweb base URL: {stow_url!r}")
    return db.upsert_target(conn, tenant_id, name, stow_url.rstrip("/"), allow_http=allow_http)


def targets(conn: Connection, tenant_id: UUID, name: str | None = None) -> list[dict[str, Any]]:
    rows = db.active_targets(conn, tenant_id, name)
    if name is not None and not rows:
        raise NotFound(f"no PACS target {name!r}; an admin adds one with POST /v1/pacs-targets")
    return rows


def stow(
    base_url: str,
    objects: list[bytes],
    *,
    timeout_s: float = STOW_TIMEOUT_S,
    outbound: OutboundPolicy | None = None,
    allow_http: bool = False,
) -> list[str]:
    """Store ``objects`` (Part 10 files) with STOW-RS; returns the stored SOP Instance UIDs.
    The target is checked against ``outbound`` (default: public addresses only) first."""
    try:
        dest = (outbound or OutboundPolicy()).check(
            base_url, what="PACS target", allow_http=allow_http
        )
    except DestinationRefused as exc:
        raise ExportFailed(f"STOW-RS to {base_url} refused: {exc.message}") from exc
    boundary = f"medtriage-{secrets.token_hex(12)}"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            for data in objects
        )
        + f"--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    try:
        # To the address that was checked (the name goes in Host and TLS SNI).
        with httpx.Client(follow_redirects=False, timeout=timeout_s) as client:
            r = client.post(
                f"{dest.url}/studies",
                content=body,
                headers=dest.headers(headers),
                extensions=dest.extensions,
            )
    except httpx.HTTPError as exc:
        raise ExportFailed(f"STOW-RS to {base_url} failed: {type(exc).__name__}") from exc
    if r.status_code not in (200, 202):
        raise ExportFailed(f"STOW-RS to {base_url} answered HTTP {r.status_code}")
    try:
        answer = r.json()
    except ValueError as exc:
        raise ExportFailed(f"STOW-RS to {base_url}: the answer is not DICOM JSON") from exc
    failed = (answer.get(_FAILED_SOP) or {}).get("Value") or []
    if failed:
        raise ExportFailed(f"STOW-RS to {base_url}: {len(failed)} object(s) refused")
    stored = (answer.get(_REFERENCED_SOP) or {}).get("Value") or []
    return [str(item[_SOP_INSTANCE]["Value"][0]) for item in stored if _SOP_INSTANCE in item]


def export_report(
    pool: ConnectionPool,
    store: ObjectStore,
    tenant_id: UUID,
    study_id: UUID,
    *,
    target: str | None = None,
    revision: int | None = None,
    outbound: OutboundPolicy | None = None,
) -> list[Export]:
    """Send the SR of ``revision`` (default: newest) to ``target`` (default: every target)."""
    with pool.connection() as conn:
        chosen = targets(conn, tenant_id, target)
    if not chosen:
        raise NotFound("this tenant has no PACS target; an admin adds one")
    sr, number = regenerate.rendered(pool, store, study_id, "sr", revision=revision)
    sop_uid = str(pydicom.dcmread(io.BytesIO(sr), stop_before_pixels=True).SOPInstanceUID)
    out = []
    for t in chosen:
        try:
            stored = stow(t["stow_url"], [sr], outbound=outbound, allow_http=t["allow_http"])
            ok = sop_uid in stored
            detail = None if ok else f"the PACS did not list {sop_uid} as stored"
        except ExportFailed as exc:
            ok, detail = False, exc.message
        out.append(Export(t["name"], number, "ok" if ok else "failed", sop_uid, detail))
    with pool.connection() as conn:
        for e in out:
            db.insert_export(
                conn,
                study_id=study_id,
                revision=e.revision,
                target=e.target,
                outcome=e.outcome,
                detail=e.detail,
                sop_instance_uid=e.sop_instance_uid,
            )
    return out
