"""What ingest checks in a data set's identifying and coded values before anything is stored.

Pure functions over a pydicom ``Dataset`` (and the file it came from, for deferred pixel
data); shared by every ingest path through ``orchestrator/ingest/core.py``. Reasons name the tag
and the rule, never the value: a value may be free text, markup or PHI.

- UIDs (0020,000D) StudyInstanceUID, (0020,000E) SeriesInstanceUID, (0008,0018)
  SOPInstanceUID, (0008,0016) SOPClassUID and the (0002,0010) TransferSyntaxUID follow the
  UI rules of PS3.5 §9.1: at most 64 characters, digits and dots, no empty component, no
  leading zero in a component other than "0" itself.
- (0008,0060) Modality is a CS value: stored upper case, refused unless it is one.
- (0028,0004) PhotometricInterpretation, when present, is one PS3.3 C.7.6.3.1.2 defines.
- The patient a study belongs to is kept as keyed digests, never as the values: the
  (0010,0020) PatientID, and (0010,0010) PatientName + (0010,0030) PatientBirthDate.
- An instance's content digest (SOP class, image size and the pixel data as encoded) tells
  a re-sent identical instance (a duplicate) from a different one with the same UID.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

# PS3.5 §9.1: a UID component is "0" or digits not starting with 0; at most 64 characters.
UID_MAX = 64
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# PS3.5 §6.2 CS: upper-case letters, digits, space and underscore, at most 16 characters.
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")
# PS3.3 C.7.6.3.1.2 (XYB since 2022).
PHOTOMETRIC = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)
# The identifying UIDs every instance needs, with their tags (for reasons).
REQUIRED_UIDS = (
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
    ("SOPInstanceUID", "(0008,0018)"),
)
_HASH_CHUNK_BYTES = 1024 * 1024


class RuleError(ValueError):
    """A value breaks a rule; ``category`` is the per-file outcome category."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a valid UID (PS3.5 §9.1), in words; None when it is one.
    One trailing NUL (the UI padding character) is allowed, as PS3.5 §6.2 pads UI with it."""
    text = value[:-1] if value.endswith("\0") else value
    if not text:
        return "is empty"
    if len(text) > UID_MAX:
        return f"is {len(text)} characters long (at most {UID_MAX})"
    if not _UID.match(text):
        if any(c not in "0123456789." for c in text):
            return "holds characters other than digits and dots"
        if text.startswith(".") or text.endswith(".") or ".." in text:
            return "has an empty component"
        return "has a component with a leading zero"
    return None


def check_uids(ds: Any) -> tuple[str, str, str, str]:
    """(study, series, SOP instance, SOP class) UIDs, each checked; raises RuleError."""
    values: list[str] = []
    for keyword, tag in REQUIRED_UIDS:
        raw = ds.get(keyword)
        value = "" if raw is None else str(raw)
        if raw is None or value == "":
            raise RuleError(
                f"{tag} {keyword} is missing or empty; every instance needs "
                "StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID",
                "missing_uid",
            )
        problem = uid_problem(value)
        if problem:
            raise RuleError(
                f"{tag} {keyword} {problem}: not a valid UID (PS3.5 9.1: at most 64 "
                "characters, digits and dots, no empty or zero-led component)",
                "invalid_uid",
            )
        values.append(value.rstrip("\0"))
    sop_class = str(ds.get("SOPClassUID", "") or "")
    problem = uid_problem(sop_class) if sop_class else None
    if problem:
        raise RuleError(f"(0008,0016) SOPClassUID {problem}: not a valid UID", "invalid_uid")
    return values[0], values[1], values[2], sop_class.rstrip("\0")


def transfer_syntax(ds: Any) -> str:
    """The (0002,0010) TransferSyntaxUID of the file meta ("" without one), checked."""
    meta = getattr(ds, "file_meta", None)
    value = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if value and (problem := uid_problem(value)):
        raise RuleError(f"(0002,0010) TransferSyntaxUID {problem}: not a valid UID", "invalid_uid")
    return value.rstrip("\0")


def modality(ds: Any) -> str:
    """(0008,0060) Modality, upper case and trimmed ("" when absent); RuleError unless CS."""
    value = str(ds.get("Modality", "") or "").strip().upper()
    if value and not _CODE_STRING.match(value):
        raise RuleError(
            "(0008,0060) Modality is not a code string (at most 16 letters, digits, "
            "spaces or underscores, e.g. CR, CT, DX)",
            "invalid_value",
        )
    return value


def check_photometric(ds: Any) -> None:
    """(0028,0004) PhotometricInterpretation, when present, must be a defined term."""
    raw = ds.get("PhotometricInterpretation")
    if raw is None:
        return
    value = str(raw).strip().upper()
    if value not in PHOTOMETRIC:
        raise RuleError(
            "(0028,0004) PhotometricInterpretation is not one PS3.3 C.7.6.3.1.2 defines "
            "(e.g. MONOCHROME2, RGB, YBR_FULL_422)",
            "invalid_value",
        )


def _digest(scope: str, *parts: str) -> str:
    h = hashlib.sha256(scope.encode())
    for part in parts:
        h.update(b"\0" + part.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _person_name(value: str) -> str:
    """The alphabetic group of a PN, case and spacing folded, empty components dropped at the
    end ("Doe^John^^" and "DOE^JOHN" are the same name)."""
    alphabetic = value.split("=", 1)[0]
    parts = [" ".join(p.split()).upper() for p in alphabetic.split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def patient_keys(ds: Any, tenant_id: str) -> tuple[str | None, str | None]:
    """Digests of (0010,0020) PatientID and of (0010,0010) PatientName + (0010,0030)
    PatientBirthDate, scoped to the tenant; None where the values are absent or empty."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    name = _person_name(str(ds.get("PatientName", "") or ""))
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    id_key = _digest("patient-id", tenant_id, patient_id) if patient_id else None
    demo_key = _digest("patient-demographics", tenant_id, name, birth) if name and birth else None
    return id_key, demo_key


def content_key(ds: Any, sop_class_uid: str, source: bytes | Path) -> str:
    """A digest of what makes two instances with one SOPInstanceUID the same: the SOP class,
    (0028,0010) Rows, (0028,0011) Columns, (0028,0008) NumberOfFrames and the pixel data
    (7FE0,0010) as encoded. Pixel data left on disk (deferred) is read in pieces."""
    h = hashlib.sha256(b"content\0")
    for value in (
        sop_class_uid,
        ds.get("Rows", ""),
        ds.get("Columns", ""),
        ds.get("NumberOfFrames", 1),
    ):
        h.update(str(value).encode() + b"\0")
    element = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if element is None:
        return h.hexdigest()
    value = getattr(element, "value", None)
    if value is None and isinstance(source, Path):
        # Deferred: read it from the file without loading it whole.
        with source.open("rb") as fh:
            fh.seek(element.value_tell)
            left = element.length
            while left > 0 and (chunk := fh.read(min(left, _HASH_CHUNK_BYTES))):
                h.update(chunk)
                left -= len(chunk)
        return h.hexdigest()
    pixels = ds.PixelData
    h.update(pixels if isinstance(pixels, bytes) else b"")
    return h.hexdigest()
