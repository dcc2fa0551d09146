"""Source values made safe to copy into generated DICOM (SR, Secondary Capture).

A sender's non-conformant value (``PatientBirthDate="1975-03-14"``) made highdicom raise
while it copied the patient and study modules, so no SR or SC could be made for the study.
Here the dates, times and date-times of the copied data set are repaired where the intent
is plain (separators dropped) and emptied otherwise, with a warning that names the
attribute and never the value.
"""

from __future__ import annotations

import logging
import re

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

# PS3.5 6.2: DA YYYYMMDD, TM HHMMSS.FFFFFF (leading parts), DT YYYYMMDDHHMMSS.FFFFFF&ZZXX.
_PATTERNS = {
    "DA": re.compile(r"^\d{8}$"),
    "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"),
    "DT": re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"),
}
# ISO 8601-style dates (1975-03-14, 1975.03.14, 1975/03/14): the intent is plain. Other
# orders (03/14/1975) are not guessed.
_ISO_DATE = re.compile(r"^(\d{4})[-./](\d{2})[-./](\d{2})$")


def _repair(vr: str, value: str) -> str:
    """The conformant form of ``value``, or "" when its intent is not plain."""
    text = value.strip()
    if not text or _PATTERNS[vr].match(text):
        return text
    if vr == "DA" and (m := _ISO_DATE.match(text)):
        return "".join(m.groups())
    if vr == "TM" and _PATTERNS["TM"].match(candidate := text.replace(":", "")):
        return candidate
    return ""


def conformant(ds: Dataset) -> Dataset:
    """``ds`` (changed in place and returned) with its top-level DA, TM and DT values
    conformant: repaired, or emptied (these copied attributes are Type 2 or optional)."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception:  # noqa: BLE001, S112 - a value pydicom cannot convert: not ours to fix
            continue
        vr = element.VR
        if vr not in _PATTERNS or element.VM != 1:
            continue
        value = element.value
        if value is None or not isinstance(value, str | bytes):
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        fixed = _repair(vr, text)
        if fixed != text.strip():
            log.warning(
                "source attribute %s (%s) is not a conformant %s value: %s in the generated object",
                element.keyword or element.tag,
                vr,
                vr,
                "repaired" if fixed else "left empty",
            )
            ds[element.tag].value = fixed
    return ds
