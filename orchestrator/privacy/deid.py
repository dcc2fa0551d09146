"""De-identification for data leaving the platform for non-clinical use (research, sharing).

The DICOM PS3.15 Annex E *Basic Application Level Confidentiality Profile*, applied as an
allow-list from two tables kept as data in ``deid_tables/``: ``annex_e_basic.csv`` (Table
E.1-1: one action per attribute it names) and ``safe_attributes.csv`` (what describes the
pixels and the technique, and identifies no one). At every nesting level an attribute in
neither table is removed, so whatever the tables do not know never leaves.

- ``X`` remove, ``Z`` zero length (or empty sequence), ``D`` dummy value of the same VR,
  ``K`` keep, ``C`` clean (we cannot clean free text safely, so it is emptied like ``Z``),
  ``U`` replace the UID by one that is consistent within the run.
- Private attributes, curves (50xx,eeee) and overlays (60xx,eeee) are removed.
- Free text inside kept sequences: code items keep standard codes only (DCM, SCT, LN...),
  their CodeMeaning replaced by the code's standard meaning (or the code value); items of a
  local scheme are dropped; any other text attribute is not on the safe list and goes.
- Replacement UIDs are ``2.25.<128 bits of HMAC-SHA256(key, old uid)>``: the same input UID
  gives the same output UID for one key, so the instances of a study stay one study, and the
  old UID cannot be recovered without the key. Without a key a fresh one is drawn per run.
- Dates and times the table does not name are emptied too (stricter than the table).
- (0012,0062) Patient Identity Removed = YES and (0012,0063)/(0012,0064) De-identification
  Method (DCM 113100, plus 113101 Clean Pixel Data where text was blanked) are written;
  (0028,0303) Longitudinal Temporal Information Modified = REMOVED.

Burned-in text: an image whose (0028,0301) Burned In Annotation is YES, or missing for a
modality that often carries text (ultrasound, secondary capture, angiography…), is written
only if a rule of ``deid_tables/burned_in_rules.csv`` (per modality, manufacturer, model and
matrix) blanks its text regions; otherwise it is refused with the reason, never exported
as if clean. The summary names files by their place in the input listing and by their new
output path, never by input name (names and folders often carry patient names).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

# Annex E action codes.
REMOVE, ZERO, DUMMY, KEEP, CLEAN, UID = "X", "Z", "D", "K", "C", "U"

TABLES = Path(__file__).parent / "deid_tables"
# PS3.15 Annex E Table E.1-1 (Basic Profile): keyword -> the action applied, kept as data.
ANNEX_E_FILE = TABLES / "annex_e_basic.csv"
# Attributes known not to identify anyone (pixels, geometry, technique), kept as data.
SAFE_FILE = TABLES / "safe_attributes.csv"
# Burned-in text regions per modality / manufacturer / model / matrix, cleaned by rule.
BURN_IN_RULES_FILE = TABLES / "burned_in_rules.csv"
_CODES = frozenset({REMOVE, ZERO, DUMMY, KEEP, CLEAN, UID})


def _rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return list(csv.DictReader(lines))


def load_annex_e(path: Path = ANNEX_E_FILE) -> dict[str, str]:
    """keyword -> action of the Annex E table file."""
    recipe = {r["keyword"]: r["action"] for r in _rows(path)}
    bad = {k: a for k, a in recipe.items() if a not in _CODES}
    if bad:
        raise ValueError(f"{path.name}: unknown actions {bad}")
    return recipe


def load_safe(path: Path = SAFE_FILE) -> frozenset[str]:
    return frozenset(r["keyword"] for r in _rows(path))


RECIPE: dict[str, str] = load_annex_e()
SAFE: frozenset[str] = load_safe()

# Dummy values per VR for action D: valid, obviously not real.
_DUMMY: dict[str, Any] = {
    "PN": "ANONYMIZED",
    "LO": "ANONYMIZED",
    "SH": "ANON",
    "LT": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "CS": "ANON",
    "AE": "ANON",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
}

# De-identification Method Code Sequence items (PS3.16 CID 7050): the basic profile, and
# the Clean Pixel Data option where burned-in text was blanked by rule.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_CODE = ("113101", "DCM", "Clean Pixel Data Option")
_LO_MAX = 64
METHOD_TEXT = "PS3.15 Annex E Basic Profile (medtriage)"
# Modalities whose images commonly carry text in the pixels (PS3.15 E.1.1 note).
BURNED_IN_PRONE = frozenset({"US", "OT", "SC", "XA", "RF", "ES", "GM", "SM", "DOC", "IVUS"})
# Dates and times not in the table are emptied as well (no Retain Longitudinal option).
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
# The root under which replacement UIDs are made (PS3.5 B.2: a UUID-derived UID).
_UID_ROOT = "2.25."
_UID_BYTES = 16
# Secondary Capture SOP classes (1.2.840.10008.5.1.4.1.1.7[.x]) are screenshots by nature.
_SC_CLASSES = "1.2.840.10008.5.1.4.1.1.7"


def _tags(recipe: dict[str, str]) -> dict[BaseTag, str]:
    out: dict[BaseTag, str] = {}
    for keyword, action in recipe.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"recipe keyword {keyword!r} is not in pydicom's dictionary")
        out[BaseTag(tag)] = action
    return out


_ACTIONS = _tags(RECIPE)
_SAFE_TAGS = frozenset(_tags(dict.fromkeys(SAFE, KEEP)))


def _is_curve_or_overlay(tag: BaseTag) -> bool:
    group = tag.group
    return (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF) and group % 2 == 0


@dataclass
class InstanceResult:
    """What happened to one file; never holds an identifying value nor an input name (they
    often carry patient names): the file is known by its place in the sorted input listing
    and by its output path, which is made of the new UIDs."""

    index: int
    burned_in: str  # "YES", "NO" or "unknown"
    modality: str
    removed: int
    changed: int
    output: str = ""
    error: str | None = None
    refused: str | None = None  # why it was not written (burned-in text, no cleaning rule)
    cleaned_by: str | None = None  # the burned-in text rule that blanked its regions


@dataclass
class DeidResult:
    files: list[InstanceResult] = field(default_factory=list)
    uids_remapped: int = 0

    def summary(self) -> dict[str, Any]:
        done = [f for f in self.files if f.error is None and f.refused is None]
        return {
            "profile": METHOD_TEXT,
            "files": len(done),
            "failed": [{"index": f.index, "error": f.error} for f in self.files if f.error],
            # Not written: pixels that may show text, and no rule to clean them.
            "refused": [
                {"index": f.index, "modality": f.modality, "reason": f.refused}
                for f in self.files
                if f.refused
            ],
            "uids_remapped": self.uids_remapped,
            "elements_removed": sum(f.removed for f in done),
            "elements_changed": sum(f.changed for f in done),
            "burned_in_cleaned": [
                {"output": f.output, "rule": f.cleaned_by} for f in done if f.cleaned_by
            ],
        }


class Deidentifier:
    """Applies the recipe as an allow-list; one instance per run keeps UID replacement
    consistent.

    At every nesting level: an attribute the Annex E table names gets its action; one the
    safe list names is kept (a sequence is walked); any other attribute is removed, so what
    the tables do not know never leaves. Code items keep standard codes only, with the
    code's standard meaning in place of the writer's (free) text."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self._uids: dict[str, str] = {}

    @property
    def uids_remapped(self) -> int:
        return len(self._uids)

    def new_uid(self, old: str) -> str:
        """The replacement of ``old``: the same for the same key, unrelated without it."""
        new = self._uids.get(old)
        if new is None:
            digest = hmac.new(self._key, old.encode(), hashlib.sha256).digest()
            new = _UID_ROOT + str(int.from_bytes(digest[:_UID_BYTES], "big"))
            self._uids[old] = new
        return new

    def deidentify(self, ds: Dataset, *, cleaned_by: str | None = None) -> InstanceResult:
        """De-identify ``ds`` in place (file meta included); pixels are not touched here."""
        burned_in = _burned_in(ds)
        modality = str(ds.get("Modality", "") or "")
        counts = [0, 0]  # removed, changed
        self._walk(ds, counts)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            self._walk(meta, counts)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD_TEXT
        methods = [BASIC_PROFILE_CODE] + ([CLEAN_PIXEL_CODE] if cleaned_by else [])
        items = []
        for value in methods:
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value
            items.append(code)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        return InstanceResult(0, burned_in, modality, counts[0], counts[1], cleaned_by=cleaned_by)

    def _walk(self, ds: Dataset, counts: list[int]) -> None:
        for elem in list(ds):
            tag = BaseTag(elem.tag)
            action = _ACTIONS.get(tag)
            if action is None and tag in _SAFE_TAGS:
                action = KEEP
            if tag.is_private or _is_curve_or_overlay(tag) or action is None:
                # Private, curve, overlay, or not known to be safe: removed.
                del ds[tag]
                counts[0] += 1
                continue
            if action == REMOVE:
                del ds[tag]
                counts[0] += 1
            elif action in (ZERO, CLEAN):
                elem.value = Sequence() if elem.VR == "SQ" else ""
                counts[1] += 1
            elif action == DUMMY:
                elem.value = Sequence() if elem.VR == "SQ" else _DUMMY.get(elem.VR, "")
                counts[1] += 1
            elif action == UID and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                new = [self.new_uid(str(v)) for v in values]
                elem.value = new if elem.VM > 1 else new[0]
                counts[1] += 1
            elif elem.VR == "SQ":
                kept = []
                for item in elem.value:
                    self._walk(item, counts)
                    if _clean_code(item):
                        kept.append(item)
                    else:
                        counts[0] += 1
                if len(kept) != len(elem.value):
                    elem.value = Sequence(kept)
            elif tag not in _ACTIONS and elem.VR in _TEMPORAL_VRS and elem.value:
                # Stricter than the table: every other date and time is emptied too, since
                # dates narrow down a patient.
                elem.value = ""
                counts[1] += 1


def _meanings() -> dict[tuple[str, str], str]:
    """(scheme, code value) -> the standard meaning, from pydicom's code dictionaries."""
    from pydicom.sr._concepts_dict import concepts

    out: dict[tuple[str, str], str] = {}
    for scheme, names in concepts.items():
        for entries in names.values():
            table: dict[str, tuple[str, list[int]]] = entries  # type: ignore[assignment]
            for value, (meaning, _cids) in table.items():
                out[(scheme, value)] = meaning
    return out


_MEANINGS: dict[tuple[str, str], str] = {}
# Coding schemes whose codes are public concepts (a local scheme, 99xxx or L, may hold
# anything a site typed, an MRN included).
STANDARD_SCHEMES = frozenset(
    {"DCM", "SCT", "SRT", "LN", "UCUM", "RADLEX", "NCIt", "UMLS", "FMA", "ICD10", "I10", "MSH"}
)


def _clean_code(item: Dataset) -> bool:
    """Clean a code item in place: the meaning becomes the code's standard meaning (or the
    code itself); False if the item is a code of a local scheme (to be dropped)."""
    if "CodeMeaning" not in item and "CodingSchemeDesignator" not in item:
        return True
    scheme = str(item.get("CodingSchemeDesignator", "") or "")
    value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "")
    if scheme not in STANDARD_SCHEMES or not value:
        return False
    if not _MEANINGS:
        _MEANINGS.update(_meanings())
    item.CodeMeaning = _MEANINGS.get((scheme, value), value)[:_LO_MAX]
    return True


def _burned_in(ds: Dataset) -> str:
    declared = str(ds.get("BurnedInAnnotation", "") or "").upper()
    if declared in ("YES", "NO"):
        return declared
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not modality or modality in BURNED_IN_PRONE or sop_class.startswith(_SC_CLASSES):
        return "unknown"
    # Not declared, for a modality that rarely carries burned-in text (CR, DX, CT, MR...).
    return "NO"


def _files(root: Path) -> Iterable[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _layout(output: Path, ds: Dataset, index: int) -> Path:
    """``<study>/<series>/<instance>.dcm`` from the replaced UIDs: input file and folder
    names are often patient names or accession numbers, so none of them is carried over."""
    parts = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID")]
    name = str(ds.get("SOPInstanceUID", "") or "") or f"instance-{index}"
    return output.joinpath(*(p or "unknown" for p in parts), f"{name}.dcm")


@dataclass(frozen=True)
class BurnInRule:
    """Where one kind of device writes text into its pixels: rectangles to blank."""

    modality: str
    manufacturer: str
    model: str  # "*": any model of the manufacturer
    rows: str  # "*" or the matrix the regions were measured on
    columns: str
    regions: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1), end exclusive

    @property
    def name(self) -> str:
        return f"{self.modality}/{self.manufacturer}/{self.model}/{self.rows}x{self.columns}"

    def matches(self, ds: Dataset) -> bool:
        def same(rule: str, value: Any) -> bool:
            return rule == "*" or rule.strip().upper() == str(value or "").strip().upper()

        return (
            same(self.modality, ds.get("Modality"))
            and same(self.manufacturer, ds.get("Manufacturer"))
            and same(self.model, ds.get("ManufacturerModelName"))
            and same(self.rows, ds.get("Rows"))
            and same(self.columns, ds.get("Columns"))
        )


def load_burn_in_rules(path: Path = BURN_IN_RULES_FILE) -> list[BurnInRule]:
    rules = []
    for r in _rows(path):
        regions = tuple(
            (int(x0), int(y0), int(x1), int(y1))
            for x0, y0, x1, y1 in (part.split() for part in r["regions"].split(";") if part.strip())
        )
        if not regions:
            raise ValueError(f"{path.name}: rule without regions: {r}")
        rules.append(
            BurnInRule(
                r["modality"], r["manufacturer"], r["model"], r["rows"], r["columns"], regions
            )
        )
    return rules


# Pixel data this module rewrites in place: native little-endian, whole bytes per sample.
_NATIVE_LE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def _blank(ds: Dataset, rule: BurnInRule) -> str | None:
    """Blank the rule's regions in every frame; the reason it cannot, or None when done."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if "PixelData" not in ds:
        return "no pixel data to clean"
    if syntax not in _NATIVE_LE:
        return "compressed or big-endian pixel data: cleaning by rule needs native pixels"
    if int(ds.get("BitsAllocated", 0)) not in (8, 16, 32) or int(
        ds.get("PlanarConfiguration", 0) or 0
    ):
        return "pixel layout not supported by cleaning (1-bit or planar)"
    pixels = ds.pixel_array.copy()
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    for x0, y0, x1, y1 in rule.regions:
        if colour:
            pixels[..., y0:y1, x0:x1, :] = 0
        else:
            pixels[..., y0:y1, x0:x1] = 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    ds.BurnedInAnnotation = "NO"
    return None


def _refusal(ds: Dataset, burned_in: str) -> str:
    modality = str(ds.get("Modality", "") or "unknown")
    declared = "YES" if burned_in == "YES" else "not declared"
    return (
        f"pixels may show burned-in text (BurnedInAnnotation {declared}, modality"
        f" {modality}) and no rule in {BURN_IN_RULES_FILE.name} cleans this device's"
        " images; not exported de-identified: clean its pixels first or add a rule"
    )


def deidentify_path(
    input: Path,
    output: Path,
    *,
    key: bytes | None = None,
    burn_in_rules: list[BurnInRule] | None = None,
) -> DeidResult:
    """De-identify a DICOM file into the file ``output``, or every file under a folder into
    ``output/<study>/<series>/<instance>.dcm`` (new UIDs). Files that are not DICOM are
    reported as failed, never copied. A file whose pixels may show text (declared, or not
    declared for a modality prone to it) is written only when a burn-in rule blanks its
    text; otherwise it is refused with the reason. The summary names no input file."""
    deid = Deidentifier(key)
    rules = load_burn_in_rules() if burn_in_rules is None else burn_in_rules
    result = DeidResult()
    single = input.is_file()
    sources = [input] if single else list(_files(input))
    for index, src in enumerate(sources):
        try:
            # force: files without the 128-byte preamble are common; what is not a dataset
            # with a SOP Class is refused below.
            ds = pydicom.dcmread(src, force=True)
            if "SOPClassUID" not in ds:
                raise InvalidDicomError("no SOP Class UID")
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on junk input
            # The reason names the problem, not the content (which may be identifying).
            result.files.append(
                InstanceResult(index, "unknown", "", 0, 0, error=f"not DICOM: {type(exc).__name__}")
            )
            continue
        burned_in = _burned_in(ds)
        cleaned_by = None
        if burned_in != "NO":
            rule = next((r for r in rules if r.matches(ds)), None)
            why = _refusal(ds, burned_in) if rule is None else _blank(ds, rule)
            if why is not None:
                modality = str(ds.get("Modality", "") or "")
                result.files.append(InstanceResult(index, burned_in, modality, 0, 0, refused=why))
                continue
            cleaned_by = rule.name if rule else None
        done = deid.deidentify(ds, cleaned_by=cleaned_by)
        done.index = index
        dst = output if single else _layout(output, ds, index)
        done.output = dst.name if single else str(dst.relative_to(output))
        dst.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dst, enforce_file_format=getattr(ds, "file_meta", None) is not None)
        result.files.append(done)
    result.uids_remapped = deid.uids_remapped
    return result
