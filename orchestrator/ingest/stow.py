"""DICOMweb STOW-RS (PS3.18 §10.5) framing: the multipart/related request body and the
Store Instances response (ReferencedSOPSequence / FailedSOPSequence) as DICOM JSON or XML.

Pure functions over bytes and datasets; the route lives in ``api/dicomweb.py``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import BinaryIO

from pydicom.dataset import Dataset

from orchestrator.errors import BadRequest
from orchestrator.ingest.core import DUPLICATE, REJECTED, FileOutcome

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

# FailureReason (0008,1197) values, as C-STORE statuses (PS3.4 Annex B, PS3.18 §10.5.3).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
# PS3.7 Annex C general status "Duplicate SOP Instance": as a FailureReason, a SOP instance
# already stored with other content; as a WarningReason, one already stored as sent.
DUPLICATE_SOP_INSTANCE = 0x0111
# Our per-file categories (ingest and preprocess) to the closest standard reason.
_REASONS = {
    "not_dicom": CANNOT_UNDERSTAND,
    "truncated": CANNOT_UNDERSTAND,
    "malformed": CANNOT_UNDERSTAND,
    "missing_uid": CANNOT_UNDERSTAND,
    "invalid_uid": CANNOT_UNDERSTAND,
    # A coded value (Modality, PhotometricInterpretation) the SOP class does not allow.
    "invalid_value": DOES_NOT_MATCH_SOP_CLASS,
    # Another patient's instance claiming the study: like study_mismatch, it does not
    # belong to the study it names.
    "patient_mismatch": DOES_NOT_MATCH_SOP_CLASS,
    "instance_conflict": DUPLICATE_SOP_INSTANCE,
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


# Part headers are looked for within this many bytes of a part's start.
_MAX_PART_HEADERS = 16 * 1024
# The body is scanned for boundaries in pieces of this size (never read whole).
_SCAN_BYTES = 1024 * 1024


def _find_all(fh: BinaryIO, needle: bytes) -> list[int]:
    """Offsets of every ``needle`` in the file, reading it piece by piece."""
    found: list[int] = []
    fh.seek(0)
    offset = 0  # file offset of window[0]
    window = b""
    while chunk := fh.read(_SCAN_BYTES):
        window += chunk
        at = window.find(needle)
        while at >= 0:
            found.append(offset + at)
            at = window.find(needle, at + 1)
        # Keep a tail too short to hold a match: a needle split across reads is still found.
        keep = len(needle) - 1
        if len(window) > keep:
            offset += len(window) - keep
            window = window[len(window) - keep :]
    return found


def _read(fh: BinaryIO, at: int, size: int) -> bytes:
    fh.seek(at)
    return fh.read(size)


def split_related(fh: BinaryIO, boundary: str) -> list[tuple[dict[str, str], int, int]]:
    """The parts of a multipart/related body (RFC 2387 / RFC 2046 §5.1.1) in a file: each
    part's headers (lower-case names) and the [start, end) offsets of its content. Raises
    BadRequest when the framing is broken."""
    if not boundary:
        raise BadRequest("multipart/related without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    # A delimiter opens the body or follows a CRLF.
    starts = [at + 2 for at in _find_all(fh, b"\r\n" + delimiter)]
    if _read(fh, 0, len(delimiter)) == delimiter:
        starts.insert(0, 0)
    if not starts:
        raise BadRequest("multipart body does not contain its boundary")
    parts: list[tuple[dict[str, str], int, int]] = []
    for index, at in enumerate(starts):
        after = at + len(delimiter)
        line = _read(fh, after, _MAX_PART_HEADERS)
        if line.startswith(b"--"):
            return parts
        line_end = line.find(b"\r\n")
        if line_end < 0:
            raise BadRequest("multipart body ends inside a boundary line")
        if index + 1 == len(starts):
            raise BadRequest("multipart body has no closing boundary (truncated upload?)")
        begin, end = after + line_end + 2, starts[index + 1] - 2
        headers, content_start = _part_headers(
            _read(fh, begin, min(end - begin, _MAX_PART_HEADERS))
        )
        parts.append((headers, begin + content_start, end))
    raise BadRequest("multipart body has no closing boundary (truncated upload?)")


def _part_headers(head: bytes) -> tuple[dict[str, str], int]:
    """A part's headers and where its content starts (relative to the part)."""
    if head.startswith(b"\r\n"):
        return {}, 2
    head_end = head.find(b"\r\n\r\n")
    if head_end < 0:
        raise BadRequest("multipart part without a blank line after its headers")
    headers: dict[str, str] = {}
    for line in head[:head_end].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(f"malformed multipart part header {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers, head_end + 4


def store_response(outcomes: Iterable[FileOutcome], retrieve_base: str | None = None) -> Dataset:
    """The Store Instances Response: stored instances referenced, already stored ones too
    with the (0008,1196) WarningReason DUPLICATE_SOP_INSTANCE, refused ones listed with a
    (0008,1197) FailureReason."""
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
            if outcome.outcome == DUPLICATE:
                item.WarningReason = DUPLICATE_SOP_INSTANCE
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
