"""A source instance's header made fit to copy into a DICOM report (SR, SC).

The reports copy the patient and study modules from their sources, and highdicom refuses
what the standard does not allow, so a source that broke a rule at the modality (an empty
(0008,0005) SpecificCharacterSet, a (0010,0030) PatientBirthDate written "1975-03-14") made
the report a 500. ``normalise`` checks every element of a copy of the header against its VR
first and

* repairs what has one obvious meaning: dates and times written with separators
  ("1975-03-14" → "19750314", "10:20:30" → "102030"), padding, lower-case code strings;
* empties what it cannot repair when the reports need it present (Type 2: unknown), and
  removes anything else it cannot repair;
* decodes text under the source's character set and writes it back as UTF-8
  (ISO_IR 192) when any of it is not ASCII, else with the default repertoire.

It returns one warning per change, naming the tag and keyword and what was done, never a
value: these lines reach the logs, and header values are PHI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import date
from typing import Any

from pydicom.charset import python_encoding
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

# Identifiers the report cannot be built without: the reports reference them as they are
# (ingest has already refused an instance whose UIDs are unusable).
_KEEP_AS_IS = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"})
# Value representations with no text to check (binary, or sequences walked separately).
_BINARY_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL", "US", "UV", "FL", "FD", "AT", "UN"}
)
# Characters writers put between the parts of a date or a time; DICOM has none (DA
# YYYYMMDD, TM HHMMSS.FFFFFF, DT both).
_SEPARATORS = re.compile(r"[-/.: T]")
_DIGITS = re.compile(r"\d+")
_UTF8 = "ISO_IR 192"
# Text VRs whose bytes (0008,0005) governs.
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "PN", "LT", "UC", "UT"})


def normalise(ds: Dataset, required: tuple[str, ...] = ()) -> list[str]:
    """Repair, empty or remove (in place) what the standard would refuse; ``required`` are
    the top-level keywords that must stay present (emptied rather than removed)."""
    warnings: list[str] = []
    _charset(ds, warnings)
    _walk(ds, frozenset(required), warnings, "")
    for line in warnings:
        log.warning("report source header: %s", line)
    return warnings


def _name(elem: DataElement, where: str) -> str:
    return f"{where}({elem.tag.group:04X},{elem.tag.element:04X}) {elem.keyword or 'private'}"


def _charset(ds: Dataset, warnings: list[str]) -> None:
    raw = ds.get("SpecificCharacterSet")
    terms = [raw] if isinstance(raw, str) else list(raw or [])
    declared = [t.strip() for t in terms if t and t.strip()]
    valid = bool(declared) and all(t in python_encoding for t in declared)
    if raw is not None and not valid:
        # Read the text as UTF-8 when all of it is (what most writers of an empty or made-up
        # term meant), else as the default repertoire.
        texts = list(_raw_text(ds))
        if any(not t.isascii() for t in texts) and all(_utf8(t) for t in texts):
            ds.SpecificCharacterSet = _UTF8
        else:
            del ds.SpecificCharacterSet
    try:
        ds.decode()  # text as str under the declared set (pydicom falls back where unknown)
    except (LookupError, UnicodeError, ValueError):
        warnings.append("(0008,0005) SpecificCharacterSet: text not decodable; kept as read")
    non_ascii = any(
        not str(v).isascii()
        for e in ds.iterall()
        if e.VR not in _BINARY_VRS and e.VR != "SQ"
        for v in _values(e) or []
    )
    wanted = _UTF8 if non_ascii else None
    if raw is not None and not valid:
        warnings.append(
            "(0008,0005) SpecificCharacterSet: empty or not a defined term; text written as"
            f" {'UTF-8 (ISO_IR 192)' if wanted else 'the default repertoire'}"
        )
    if wanted:
        ds.SpecificCharacterSet = wanted
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


def _raw_text(ds: Dataset) -> Iterator[bytes]:
    """The undecoded bytes of the top-level text elements that the character set governs."""
    for tag in ds.keys():  # noqa: SIM118  # iterating ds itself would decode every element
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.value:
            vr = elem.VR or _dictionary_vr(tag)
            if vr in _CHARSET_VRS:
                yield bytes(elem.value)


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _values(elem: DataElement) -> list[Any] | None:
    """The element's values (empty: no value); None if pydicom cannot read them at all."""
    try:
        value = elem.value
    except (ValueError, TypeError, OverflowError):
        return None
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def _walk(ds: Dataset, required: frozenset[str], warnings: list[str], where: str) -> None:
    for elem in list(ds):
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value or []):
                _walk(item, frozenset(), warnings, f"{where}{elem.keyword or 'sequence'}[{n}] ")
            continue
        if (
            elem.keyword in _KEEP_AS_IS
            or elem.VR in _BINARY_VRS
            or elem.keyword == ("SpecificCharacterSet")
        ):
            continue
        _check(ds, elem, elem.keyword in required, warnings, where)


def _check(ds: Dataset, elem: DataElement, required: bool, warnings: list[str], where: str) -> None:
    values = _values(elem)
    if values == []:
        return
    fixed: list[Any] = []
    repaired = False
    for value in values or []:
        if _valid(elem.VR, value):
            fixed.append(value)
            continue
        better = _repair(elem.VR, value)
        if better is None:
            fixed = []
            break
        fixed.append(better)
        repaired = True
    if values and len(fixed) == len(values):
        if repaired:
            elem.value = fixed if len(fixed) > 1 else fixed[0]
            warnings.append(f"{_name(elem, where)}: not a valid {elem.VR}; repaired")
        return
    if required:
        elem.value = ""
        warnings.append(f"{_name(elem, where)}: not a valid {elem.VR}; emptied (unknown)")
    else:
        del ds[elem.tag]
        warnings.append(f"{_name(elem, where)}: not a valid {elem.VR}; removed")


def _valid(vr: str, value: Any) -> bool:
    text = value if isinstance(value, str) else str(value)
    try:
        validate_value(vr, text if vr not in ("DS", "IS") else text.strip(), RAISE)
    except (ValueError, TypeError):
        return False
    if vr == "DA" and text:
        return _date(text)
    return True


def _date(text: str) -> bool:
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _repair(vr: str, value: Any) -> Any:
    """The one obvious conformant spelling of ``value``, or None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if vr in ("DA", "TM", "DT"):
        head, dot, frac = text.partition(".") if vr != "DA" else (text, "", "")
        digits = _SEPARATORS.sub("", head)
        candidate = digits + (dot + frac if frac and _DIGITS.fullmatch(frac) else "")
    elif vr == "CS":
        candidate = text.upper()
    else:
        candidate = text
    if candidate != value and _valid(vr, candidate):
        return candidate
    return None
