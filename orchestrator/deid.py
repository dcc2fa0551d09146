"""De-identification for data leaving the platform for non-clinical use (research, sharing).

The DICOM PS3.15 Annex E *Basic Application Level Confidentiality Profile* as a recipe table:
one action per attribute, applied at every nesting level, plus the profile's blanket rules:

- ``X`` remove, ``Z`` zero length (or empty sequence), ``D`` dummy value of the same VR,
  ``K`` keep, ``C`` clean (we cannot clean free text safely, so it is emptied like ``Z``),
  ``U`` replace the UID by one that is consistent within the run.
- Private attributes, curves (50xx,eeee) and overlays (60xx,eeee) are removed.
- Replacement UIDs are ``2.25.<128 bits of HMAC-SHA256(key, old uid)>``: the same input UID
  gives the same output UID for one key, so the instances of a study stay one study, and the
  old UID cannot be recovered without the key. Without a key a fresh one is drawn per run.
- Dates and times the table does not name are emptied too (stricter than the table).
- (0012,0062) Patient Identity Removed = YES and (0012,0063)/(0012,0064) De-identification
  Method (DCM 113100) are written; (0028,0303) Longitudinal Temporal Information Modified =
  REMOVED, since the profile empties the dates.

Pixel data are never changed. Text burned into the pixels is not removed: each instance is
flagged from (0028,0301) Burned In Annotation, and as ``unknown`` where the attribute is
missing for a modality that often carries it (ultrasound, secondary capture, angiography…);
such files need the Clean Pixel Data option (a person or an OCR pass) before they leave.
"""

from __future__ import annotations

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

# Annex E action codes.
REMOVE, ZERO, DUMMY, KEEP, CLEAN, UID = "X", "Z", "D", "K", "C", "U"

# Where the standard gives a choice (X/Z, X/D, Z/D, X/Z/D...), the table holds the one we
# apply: Z where the attribute is Type 2 in common IODs (removal would break conformance),
# D where a Type 1 attribute needs a value, X otherwise.
RECIPE: dict[str, str] = {
    # Patient
    "PatientName": ZERO,
    "PatientID": ZERO,
    "IssuerOfPatientID": REMOVE,
    "PatientBirthDate": ZERO,
    "PatientBirthTime": REMOVE,
    "PatientSex": ZERO,
    "PatientAge": REMOVE,
    "PatientSize": REMOVE,
    "PatientWeight": REMOVE,
    "PatientAddress": REMOVE,
    "PatientTelephoneNumbers": REMOVE,
    "PatientBirthName": REMOVE,
    "PatientMotherBirthName": REMOVE,
    "OtherPatientIDs": REMOVE,
    "OtherPatientNames": REMOVE,
    "OtherPatientIDsSequence": REMOVE,
    "PatientInsurancePlanCodeSequence": REMOVE,
    "PatientPrimaryLanguageCodeSequence": REMOVE,
    "MedicalRecordLocator": REMOVE,
    "MilitaryRank": REMOVE,
    "BranchOfService": REMOVE,
    "CountryOfResidence": REMOVE,
    "RegionOfResidence": REMOVE,
    "EthnicGroup": REMOVE,
    "Occupation": REMOVE,
    "SmokingStatus": REMOVE,
    "AdditionalPatientHistory": REMOVE,
    "PregnancyStatus": REMOVE,
    "LastMenstrualDate": REMOVE,
    "PatientReligiousPreference": REMOVE,
    "PatientSexNeutered": REMOVE,
    "MedicalAlerts": REMOVE,
    "Allergies": REMOVE,
    "PatientComments": REMOVE,
    "ReferencedPatientSequence": REMOVE,
    "ReferencedPatientPhotoSequence": REMOVE,
    "ResponsiblePerson": REMOVE,
    "ResponsibleOrganization": REMOVE,
    "PatientState": REMOVE,
    "AdmissionID": REMOVE,
    "IssuerOfAdmissionIDSequence": REMOVE,
    "CurrentPatientLocation": REMOVE,
    "PatientInstitutionResidence": REMOVE,
    "AdmittingDiagnosesDescription": REMOVE,
    "AdmittingDiagnosesCodeSequence": REMOVE,
    # Study, visit, request
    "AccessionNumber": ZERO,
    "IssuerOfAccessionNumberSequence": REMOVE,
    "StudyID": ZERO,
    "StudyDate": ZERO,
    "StudyTime": ZERO,
    "StudyDescription": REMOVE,
    "StudyComments": REMOVE,
    "ReferringPhysicianName": ZERO,
    "ReferringPhysicianAddress": REMOVE,
    "ReferringPhysicianTelephoneNumbers": REMOVE,
    "ReferringPhysicianIdentificationSequence": REMOVE,
    "PhysiciansOfRecord": REMOVE,
    "PhysiciansOfRecordIdentificationSequence": REMOVE,
    "NameOfPhysiciansReadingStudy": REMOVE,
    "PhysiciansReadingStudyIdentificationSequence": REMOVE,
    "RequestingPhysician": REMOVE,
    "RequestingService": REMOVE,
    "RequestedProcedureDescription": REMOVE,
    "RequestedProcedureID": REMOVE,
    "RequestedProcedureComments": REMOVE,
    "RequestAttributesSequence": REMOVE,
    "PlacerOrderNumberImagingServiceRequest": REMOVE,
    "FillerOrderNumberImagingServiceRequest": REMOVE,
    "ImagingServiceRequestComments": REMOVE,
    "ReferencedStudySequence": REMOVE,
    "ReferencedPerformedProcedureStepSequence": REMOVE,
    "ScheduledPerformingPhysicianName": REMOVE,
    "ConfidentialityConstraintOnPatientDataDescription": REMOVE,
    # Institution, equipment, staff
    "InstitutionName": REMOVE,
    "InstitutionAddress": REMOVE,
    "InstitutionCodeSequence": REMOVE,
    "InstitutionalDepartmentName": REMOVE,
    "StationName": REMOVE,
    "DeviceSerialNumber": REMOVE,
    "DetectorID": REMOVE,
    "PlateID": REMOVE,
    "GeneratorID": REMOVE,
    "CassetteID": REMOVE,
    "GantryID": REMOVE,
    "PerformingPhysicianName": REMOVE,
    "PerformingPhysicianIdentificationSequence": REMOVE,
    "OperatorsName": REMOVE,
    "OperatorIdentificationSequence": REMOVE,
    "DateOfLastCalibration": REMOVE,
    "TimeOfLastCalibration": REMOVE,
    # Series, acquisition, content
    "SeriesDate": REMOVE,
    "SeriesTime": REMOVE,
    "AcquisitionDate": REMOVE,
    "AcquisitionTime": REMOVE,
    "AcquisitionDateTime": REMOVE,
    "ContentDate": ZERO,
    "ContentTime": ZERO,
    "InstanceCreationDate": REMOVE,
    "InstanceCreationTime": REMOVE,
    "InstanceCoercionDateTime": REMOVE,
    "TimezoneOffsetFromUTC": REMOVE,
    "SeriesDescription": REMOVE,
    "ProtocolName": REMOVE,
    "ImageComments": REMOVE,
    "AcquisitionComments": REMOVE,
    "AcquisitionDeviceProcessingDescription": REMOVE,
    "AcquisitionProtocolDescription": REMOVE,
    "DerivationDescription": REMOVE,
    "ContrastBolusAgent": ZERO,
    "IdentifyingComments": REMOVE,
    "PerformedProcedureStepID": REMOVE,
    "PerformedProcedureStepStartDate": REMOVE,
    "PerformedProcedureStepStartTime": REMOVE,
    "PerformedProcedureStepEndDate": REMOVE,
    "PerformedProcedureStepEndTime": REMOVE,
    "PerformedProcedureStepDescription": REMOVE,
    "CommentsOnThePerformedProcedureStep": REMOVE,
    "PerformedStationAETitle": REMOVE,
    "PerformedStationName": REMOVE,
    "PerformedLocation": REMOVE,
    "ContentSequence": REMOVE,
    "AcquisitionContextSequence": REMOVE,
    "OriginalAttributesSequence": REMOVE,
    "ReferencedImageSequence": REMOVE,
    "SourceImageSequence": REMOVE,
    # Structured report and presentation people
    "PersonName": DUMMY,
    "VerifyingObserverName": DUMMY,
    "VerifyingOrganization": DUMMY,
    "VerifyingObserverIdentificationCodeSequence": ZERO,
    "ContentCreatorName": ZERO,
    "ContentCreatorIdentificationCodeSequence": REMOVE,
    # UIDs that identify instances (well-known class and syntax UIDs are kept)
    "StudyInstanceUID": UID,
    "SeriesInstanceUID": UID,
    "SOPInstanceUID": UID,
    "MediaStorageSOPInstanceUID": UID,
    "ReferencedSOPInstanceUID": UID,
    "ReferencedSOPInstanceUIDInFile": UID,
    "FrameOfReferenceUID": UID,
    "SynchronizationFrameOfReferenceUID": UID,
    "ReferencedFrameOfReferenceUID": UID,
    "RelatedFrameOfReferenceUID": UID,
    "SourceFrameOfReferenceUID": UID,
    "InstanceCreatorUID": UID,
    "IrradiationEventUID": UID,
    "ConcatenationUID": UID,
    "DimensionOrganizationUID": UID,
    "DeviceUID": UID,
    "TargetUID": UID,
    "FiducialUID": UID,
    "DoseReferenceUID": UID,
    "StorageMediaFileSetUID": UID,
    "PaletteColorLookupTableUID": UID,
    "UID": UID,
    "TemplateExtensionOrganizationUID": UID,
    "TemplateExtensionCreatorUID": UID,
    "ContextGroupExtensionCreatorUID": UID,
    "FailedSOPInstanceUIDList": UID,
    # Kept on purpose (listed so a reader sees they were considered)
    "SOPClassUID": KEEP,
    "MediaStorageSOPClassUID": KEEP,
    "TransferSyntaxUID": KEEP,
    "ReferencedSOPClassUID": KEEP,
    "Modality": KEEP,
    "BodyPartExamined": KEEP,
    "BurnedInAnnotation": KEEP,
}

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

# De-identification Method Code Sequence item (PS3.16 CID 7050): the basic profile.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
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


def _is_curve_or_overlay(tag: BaseTag) -> bool:
    group = tag.group
    return (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF) and group % 2 == 0


@dataclass
class InstanceResult:
    """What happened to one file; never holds an identifying value."""

    path: str
    burned_in: str  # "YES", "NO" or "unknown"
    modality: str
    removed: int
    changed: int
    error: str | None = None


@dataclass
class DeidResult:
    files: list[InstanceResult] = field(default_factory=list)
    uids_remapped: int = 0

    def summary(self) -> dict[str, Any]:
        done = [f for f in self.files if f.error is None]
        return {
            "profile": METHOD_TEXT,
            "files": len(done),
            "failed": [{"path": f.path, "error": f.error} for f in self.files if f.error],
            "uids_remapped": self.uids_remapped,
            "elements_removed": sum(f.removed for f in done),
            "elements_changed": sum(f.changed for f in done),
            # Files whose pixels may show text: review them before they leave.
            "burned_in_annotation": [
                {"path": f.path, "burned_in": f.burned_in, "modality": f.modality}
                for f in done
                if f.burned_in != "NO"
            ],
        }


class Deidentifier:
    """Applies the recipe; one instance per run keeps UID replacement consistent."""

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

    def deidentify(self, ds: Dataset) -> InstanceResult:
        """De-identify ``ds`` in place (file meta included); the pixels are not touched."""
        burned_in = _burned_in(ds)
        modality = str(ds.get("Modality", "") or "")
        counts = [0, 0]  # removed, changed
        self._walk(ds, counts)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            self._walk(meta, counts)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD_TEXT
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        return InstanceResult("", burned_in, modality, counts[0], counts[1])

    def _walk(self, ds: Dataset, counts: list[int]) -> None:
        for elem in list(ds):
            tag = BaseTag(elem.tag)
            if tag.is_private or _is_curve_or_overlay(tag):
                del ds[tag]
                counts[0] += 1
                continue
            action = _ACTIONS.get(tag, KEEP)
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
                for item in elem.value:
                    self._walk(item, counts)
            elif tag not in _ACTIONS and elem.VR in _TEMPORAL_VRS and elem.value:
                # Stricter than the table: every other date and time is emptied too (RT plan,
                # structure set, review dates...), since dates narrow down a patient.
                elem.value = ""
                counts[1] += 1


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


def deidentify_path(input: Path, output: Path, *, key: bytes | None = None) -> DeidResult:
    """De-identify a DICOM file into the file ``output``, or every file under a folder into
    ``output/<study>/<series>/<instance>.dcm`` (new UIDs). Files that are not DICOM are
    reported as failed, never copied."""
    deid = Deidentifier(key)
    result = DeidResult()
    single = input.is_file()
    sources = [input] if single else list(_files(input))
    for index, src in enumerate(sources):
        name = src.name if single else str(src.relative_to(input))
        try:
            # force: files without the 128-byte preamble are common; what is not a dataset
            # with a SOP Class is refused below.
            ds = pydicom.dcmread(src, force=True)
            if "SOPClassUID" not in ds:
                raise InvalidDicomError("no SOP Class UID")
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on junk input
            # The reason names the problem, not the content (which may be identifying).
            result.files.append(
                InstanceResult(name, "unknown", "", 0, 0, error=f"not DICOM: {type(exc).__name__}")
            )
            continue
        done = deid.deidentify(ds)
        done.path = name
        dst = output if single else _layout(output, ds, index)
        dst.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dst, enforce_file_format=getattr(ds, "file_meta", None) is not None)
        result.files.append(done)
    result.uids_remapped = deid.uids_remapped
    return result
