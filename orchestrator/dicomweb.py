"""DICOMweb STOW-RS (PS3.18 §10.5) framing: the multipart/related request body and the
Store Instances response (ReferencedSOPSequence / FailedSOPSequence) as DICOM JSON or XML.

Pure functions over bytes and datasets; the route lives in ``api/dicomweb.py``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from pydicom.dataset import Dataset

from orchestrator.errors import BadRequest
from orchestrator.ingest import REJECTED, FileOutcome

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

# FailureReason (0008,1197) values, as C-STORE statuses (PS3.4 Annex B, PS3.18 §10.5.3).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
# Our per-file categories (ingest and preprocess) to the closest standard reason.
_REASONS = {
    "not_dicom": CANNOT_UNDERSTAND,
    "truncated": CANNOT_UNDERSTAND,
    "malformed": CANNOT_UNDERSTAND,
    "missing_uid": CANNOT_UNDERSTAND,
    "archive": CANNOT_UNDERSTAND,
    "media_type": CANNOT_UNDERSTAND,
    "no_pixel_data": DOES_NOT_MATCH_SOP_CLASS,
    "not_an_image": DOES_NOT_MATCH_SOP_CLASS,
    # The instance does not belong to the study named by the target resource.
    "study_mismatch": DOES_NOT_MATCH_SOP_CLASS,
    "too_large": OUT_OF_RESOURCES,
    "unsupported_transfer_syntax": TRANSFER_SYNTAX_NOT_SUPPORTED,
}


def failure_reason(category: str | None) -> int:
    return _REASONS.get(category or "", PROCESSING_FAILURE)


def split_related(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body (RFC 2387 / RFC 2046 §5.1.1): each part's
    headers (lower-case names) and content. Raises BadRequest when the framing is broken."""
    if not boundary:
        raise BadRequest("multipart/related without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise BadRequest("multipart body does not contain its boundary")
    parts: list[tuple[dict[str, str], bytes]] = []
    pos = start + len(delimiter)
    while True:
        if body[pos : pos + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise BadRequest("multipart body ends inside a boundary line")
        pos = line_end + 2
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise BadRequest("multipart body has no closing boundary (truncated upload?)")
        parts.append(_part(body[pos:end]))
        pos = end + 2 + len(delimiter)


def _part(raw: bytes) -> tuple[dict[str, str], bytes]:
    if raw.startswith(b"\r\n"):
        return {}, raw[2:]
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise BadRequest("multipart part without a blank line after its headers")
    headers: dict[str, str] = {}
    for line in raw[:head_end].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(f"malformed multipart part header {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers, raw[head_end + 4 :]


def store_response(outcomes: Iterable[FileOutcome], retrieve_base: str | None = None) -> Dataset:
    """The Store Instances Response: stored (and already stored) instances referenced,
    refused ones listed with a FailureReason."""
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.outcome == REJECTED:
            item.FailureReason = failure_reason(outcome.category)
            failed.append(item)
        else:
            referenced.append(item)
    ds = Dataset()
    if retrieve_base:
        ds.RetrieveURL = retrieve_base
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def to_xml(ds: Dataset) -> bytes:
    """A dataset as PS3.19 Native DICOM Model XML (enough for the response's VRs)."""
    root = ET.Element("NativeDicomModel", xmlns=NATIVE_DICOM_NS)
    _xml_elements(root, ds)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body


def _xml_elements(parent: ET.Element, ds: Dataset) -> None:
    for elem in ds:
        attr = ET.SubElement(
            parent,
            "DicomAttribute",
            {"tag": f"{elem.tag:08X}", "vr": elem.VR, "keyword": elem.keyword},
        )
        if elem.VR == "SQ":
            for number, item in enumerate(elem.value, start=1):
                _xml_elements(ET.SubElement(attr, "Item", number=str(number)), item)
            continue
        values = elem.value if elem.VM > 1 else ([elem.value] if elem.value != "" else [])
        for number, value in enumerate(values, start=1):
            ET.SubElement(attr, "Value", number=str(number)).text = str(value)
