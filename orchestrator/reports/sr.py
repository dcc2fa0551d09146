"""The report as a DICOM Comprehensive 3D SR holding a TID1500 measurement report (highdicom).

One TID1501 measurement group per (image, model result): the algorithm identification
carries the model name, version and arm (``arm=live|shadow``), the source image is
referenced by SOP class and instance UID, the predicted label is a qualitative evaluation
(121071 Finding) and the top-class confidence a 122157 Probability measurement without
units. A closed review adds its verdict to the live triage groups. Patient and study
modules come from the source instances (evidence), so the SR files with the study.
"""

from __future__ import annotations

from copy import deepcopy
from io import BytesIO
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from orchestrator.reports.conform import conformant
from orchestrator.reports.context import ReportContext

MANUFACTURER = "medtriage"
DEVICE_NAME = "medtriage triage pipeline"
# A fixed series number for machine-generated reports, far from modality series.
SERIES_NUMBER = 9701
# Private concepts (99-prefixed coding scheme: the DICOM way to add local codes).
_SCHEME = "99MEDTRIAGE"
REVIEWED_LABEL = Code("reviewed-label", _SCHEME, "Label after clinician review")
# Model labels -> SNOMED CT concepts; anything else gets a local code.
LABEL_CODES = {
    "normal": codes.SCT.Normal,
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
}


# Type 2 patient/study attributes (present, possibly empty) the SR copies from its evidence;
# a source may lack them.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)


def evidence(source: Dataset) -> Dataset:
    ds = conformant(deepcopy(source))
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _label_code(label: str) -> Code:
    return LABEL_CODES.get(label) or Code(label[:16], _SCHEME, label)


def _uid(*parts: str) -> str:
    # Stable per (model, version): the same device observer across reports.
    return str(generate_uid(entropy_srcs=["medtriage", *parts]))


def _group(
    n: int,
    source: Dataset,
    result: dict[str, Any],
    reviewed: str | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    model, version, arm = result["model"], str(result["version"]), result["arm"]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model, version=version, parameters=[f"arm={arm}"], manufacturer=MANUFACTURER
    )
    evaluations = [hd.sr.QualitativeEvaluation(codes.DCM.Finding, _label_code(result["label"]))]
    if reviewed is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(REVIEWED_LABEL, _label_code(reviewed)))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(generate_uid()), identifier=f"image {n} {model} v{version} {arm}"
        ),
        algorithm_id=algorithm,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
        ],
        qualitative_evaluations=evaluations,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(result["confidence"]),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        ],
    )


def _reviewed_label(report: dict[str, Any], live_label: str) -> str | None:
    review = report.get("review") or {}
    if review.get("status") != "closed" or not review.get("verdict"):
        return None
    return str(review["correct_label"]) if review["verdict"] == "override" else live_label


def render(ctx: ReportContext, revision: int) -> bytes:
    """The SR (Explicit VR Little Endian, Part 10) for one report revision."""
    report = ctx.report
    sources = [
        evidence(ctx.sources[str(i["id"])])
        for i in report["instances"]
        if str(i["id"]) in ctx.sources
    ]
    if not sources:
        raise ValueError("no source instance to reference: the SR needs at least one image")
    groups = []
    for n, inst in enumerate(report["instances"], start=1):
        source = ctx.sources.get(str(inst["id"]))
        if source is None:
            continue
        for result in inst["results"]:
            is_live_triage = result["model"] == "triage" and result["arm"] == "live"
            reviewed = _reviewed_label(report, result["label"]) if is_live_triage else None
            groups.append(_group(n, source, result, reviewed))
    live = sorted(
        {
            f"{r['model']} v{r['version']}"
            for i in report["instances"]
            for r in i["results"]
            if r["arm"] == "live"
        }
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(*live),
            name=DEVICE_NAME,
            manufacturer_name=MANUFACTURER,
            # The live models, e.g. "analysis v1, triage v2" (LO: at most 64 characters).
            model_name=", ".join(live)[:64] or DEVICE_NAME,
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=content[0],
        series_instance_uid=str(generate_uid()),
        series_number=SERIES_NUMBER,
        sop_instance_uid=str(generate_uid()),
        instance_number=revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=(report.get("review") or {}).get("status") == "closed",
        series_description="AI triage report, not a diagnosis",
    )
    buf = BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
