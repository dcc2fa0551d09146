"""Applicability rules: which model set an image is for, and why not (unit, no services)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from orchestrator.inference.specs import load_repository
from orchestrator.samples import radiograph
from orchestrator.settings import REPO_ROOT
from orchestrator.triage import applicability
from orchestrator.triage.applicability import RulesError, load_set, load_sets, patient_age_years

REPO = REPO_ROOT / "model_repository"
MODELS = tuple(load_repository(REPO))
SHARED = REPO_ROOT.parent / "shared" / "data" / "dicom"


@pytest.fixture(scope="module")
def sets() -> list[applicability.ModelSet]:
    return load_sets(REPO, MODELS)


def _chest(**changes: object) -> Dataset:
    image = np.full((28, 28), 128, dtype=np.uint8)
    ds = dcmread(io.BytesIO(radiograph(image, study_uid="1.2.3", size=256)))
    ds.PatientAge = "003Y"
    ds.ViewPosition = "AP"
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _chest_set(sets: list[applicability.ModelSet]) -> applicability.ModelSet:
    return next(s for s in sets if s.name == "chest_xr")


def test_the_repository_declares_the_chest_set(sets: list[applicability.ModelSet]) -> None:
    chest = _chest_set(sets)
    assert chest.models[:2] == ("triage", "analysis")
    assert {"CR", "DX"} <= chest.modalities


def test_a_paediatric_chest_film_is_applicable(sets: list[applicability.ModelSet]) -> None:
    verdict = _chest_set(sets).evaluate(_chest())
    assert verdict.applicable and not verdict.warnings, verdict


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"Modality": "MR"}, "Modality MR"),
        ({"BodyPartExamined": "KNEE"}, "BodyPartExamined KNEE"),
        ({"ViewPosition": "LL"}, "ViewPosition LL"),
        ({"PatientAge": "045Y"}, "patient age 45.0 years is outside 1-5 years"),
        ({"PatientAge": "006M"}, "patient age 0.5 years"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "SOP class 1.2.840.10008.5.1.4.1.1.2"),
        ({"PhotometricInterpretation": "RGB"}, "PhotometricInterpretation RGB"),
        ({"Modality": None}, "Modality is absent"),
    ],
    ids=["mr", "knee", "lateral", "adult", "infant", "ct-sop-class", "rgb", "no-modality"],
)
def test_each_failed_rule_is_said_in_words(
    sets: list[applicability.ModelSet], changes: dict[str, object], words: str
) -> None:
    verdict = _chest_set(sets).evaluate(_chest(**changes))
    assert not verdict.applicable
    assert any(words in r for r in verdict.reasons), verdict.reasons


@pytest.mark.parametrize(
    ("tag", "warning"),
    [("BodyPartExamined", "body_part_unknown"), ("ViewPosition", "view_position_unknown")],
)
def test_absent_tags_follow_the_policy(
    sets: list[applicability.ModelSet], tag: str, warning: str
) -> None:
    verdict = _chest_set(sets).evaluate(_chest(**{tag: None}))
    assert verdict.applicable and warning in verdict.warnings


def test_age_from_birth_date_when_patient_age_is_absent(
    sets: list[applicability.ModelSet],
) -> None:
    ds = _chest(PatientAge=None, PatientBirthDate="20200101", StudyDate="20230101")
    assert patient_age_years(ds) == pytest.approx(3.0, abs=0.01)
    assert _chest_set(sets).evaluate(ds).applicable
    unknown = _chest(PatientAge=None, PatientBirthDate=None)
    assert "age_unknown" in _chest_set(sets).evaluate(unknown).warnings


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "SC_rgb_gdcm_KY.dcm",
        "dicom-test-files/WG04/RLE/US1_RLE",
        "dicom-test-files/dcmqi/segmentations/23x38x3/seg/label.seg",
        "dicom-test-files/dcmqi/segmentations/partial_overlaps.dcm",
    ],
    ids=["ct", "mr", "secondary-capture", "ultrasound-doppler", "seg-label", "seg-overlaps"],
)
def test_other_modalities_meet_no_set(sets: list[applicability.ModelSet], name: str) -> None:
    path = SHARED / name if "/" in name else get_testdata_file(name)
    ds = dcmread(str(path), stop_before_pixels=True, force=True)
    verdicts = applicability.evaluate(sets, ds)
    assert verdicts and not any(v.applicable for v in verdicts), verdicts
    assert "chest_xr:" in applicability.not_applicable_reason(verdicts)


def _write(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "triage"
    folder.mkdir()
    path = folder / applicability.RULES_FILENAME
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('set = "chest"\nmodels = ["triage"]\n[rules]\nmodalities = "CR"\n', ":4:"),
        ('set = "chest"\nmodels = ["triage"]\n[rules]\nmodality = ["CR"]\n', ":4:"),
        ('set = "chest"\nmodels = ["triage", "nope"]\n[rules]\nmodalities = ["CR"]\n', ":2:"),
        ('set = "chest"\nmodels = ["triage"]\n[rules]\nmodalities = [\n', "not valid TOML"),
        (
            'set = "chest"\nmodels = ["triage"]\n[rules]\nmodalities = ["CR"]\n'
            '[when_absent]\nbody_part = "maybe"\n',
            ":6:",
        ),
        ('set = "chest"\nmodels = ["triage"]\n[rules]\nage_years = { min = 9, max = 2 }\n', ":4:"),
    ],
    ids=["not-a-list", "unknown-rule", "unknown-model", "bad-toml", "bad-policy", "age-order"],
)
def test_a_malformed_rule_file_names_file_and_line(tmp_path: Path, body: str, where: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(RulesError) as caught:
        load_set(path, ["triage", "analysis"])
    assert str(path) in str(caught.value) and where in str(caught.value), str(caught.value)
