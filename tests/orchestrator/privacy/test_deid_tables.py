"""De-identification as an allow-list from the tables in orchestrator/privacy/deid_tables/: every
row of the PS3.15 Annex E table applied, attributes in neither table removed, free text in
kept sequences cleaned, no input file name in the summary, and burned-in text either
blanked by a rule (kept as data) or the image refused with the reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from orchestrator.privacy import deid
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT

SENTINEL = "SENTINEL778899"
_VALUES = {
    "DA": "20010203",
    "TM": "101010",
    "DT": "20010203101010",
    "AS": "045Y",
    "IS": "7",
    "DS": "1.5",
    "CS": "SENTINEL",
    "AE": "SENTINELAE",
    "SH": "SENTINEL7788",
    "US": 5,
    "SS": 5,
    "UL": 5,
    "SL": 5,
    "FL": 1.5,
    "FD": 1.5,
    "OB": b"SENTINEL",
    "UN": b"SENTINEL",
    "AT": 0x00100010,
}


def _value(vr: str) -> object:
    if vr == "UI":
        return generate_uid()
    if vr == "SQ":
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = "121071", "DCM"
        item.CodeMeaning = SENTINEL
        return [item]
    return _VALUES.get(vr, SENTINEL)


def _one(keyword: str) -> tuple[Dataset, object]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag).split(" or ")[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    value = _value(vr)
    target = ds.file_meta if tag >> 16 == 0x0002 else ds
    target.add_new(tag, vr, value)
    return ds, value


def test_every_row_of_the_annex_e_table_is_applied() -> None:
    """Walks the whole table file: each attribute, alone with a value, gets its action."""
    assert len(deid.RECIPE) > 250
    walked = 0
    for keyword, action in deid.RECIPE.items():
        if keyword in ("SOPClassUID", "BurnedInAnnotation"):
            continue  # written or read by deidentify itself
        ds, before = _one(keyword)
        deid.Deidentifier(b"k" * 32).deidentify(ds)
        target = (
            ds.file_meta
            if keyword.startswith("MediaStorage") or keyword in ("TransferSyntaxUID",)
            else ds
        )
        walked += 1
        if action == deid.REMOVE:
            assert keyword not in target, keyword
            continue
        assert keyword in target, (keyword, action)
        after = target[tag_for_keyword(keyword)].value
        if action in (deid.ZERO, deid.CLEAN):
            assert after in ("", None) or len(after) == 0, keyword
        elif action == deid.DUMMY:
            assert after != before and SENTINEL not in str(after), keyword
        elif action == deid.UID:
            assert str(after).startswith("2.25.") and after != before, keyword
        else:
            assert action == deid.KEEP and after == before, keyword
    print(f"\nAnnex E rows walked: {walked} of {len(deid.RECIPE)}")
    assert walked >= len(deid.RECIPE) - 2


def test_issue_attributes_are_handled_by_the_table() -> None:
    for keyword, action in {
        "ConsultingPhysicianName": deid.REMOVE,
        "ReasonForStudy": deid.REMOVE,
        "OrderCallbackPhoneNumber": deid.REMOVE,
        "TextComments": deid.REMOVE,
        "ObservationUID": deid.UID,
        "TrackingUID": deid.UID,
    }.items():
        assert deid.RECIPE[keyword] == action, keyword


def _planted() -> bytes:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.ConsultingPhysicianName = f"CONSULT{SENTINEL}"
    ds.ReasonForStudy = f"REASON {SENTINEL}"
    ds.OrderCallbackPhoneNumber = "555-778899"
    ds.TextComments = f"TEXT {SENTINEL}"
    ds.ObservationUID = obs = generate_uid()
    ds.TrackingUID = trk = generate_uid()
    ds.SeriesType = ["STATIC", "IMAGE"]  # in neither table: not known to be safe
    lung = Dataset()
    lung.CodeValue, lung.CodingSchemeDesignator = "39607008", "SCT"
    lung.CodeMeaning = "Lung of MRN-778899"
    local = Dataset()
    local.CodeValue, local.CodingSchemeDesignator, local.CodeMeaning = (
        "MRN778899",
        "99LOCAL",
        "Jones chest",
    )
    ds.AnatomicRegionSequence = [lung, local]
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator = "24627-2", "LN"
    procedure.CodeMeaning = "CT Chest for MRN-778899"
    ds.ProcedureCodeSequence = [procedure]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert obs.encode() in buf.getvalue() and trk.encode() in buf.getvalue()
    return buf.getvalue()


def test_unknown_attributes_and_free_text_in_sequences_do_not_leave(tmp_path: Path) -> None:
    src = tmp_path / "in.dcm"
    src.write_bytes(_planted())
    original = pydicom.dcmread(src)
    summary = deid.deidentify_path(src, tmp_path / "out.dcm").summary()
    assert summary["files"] == 1
    raw = (tmp_path / "out.dcm").read_bytes()
    for needle in ("778899", "CONSULT", "REASON", "TEXT ", "Jones", "STATIC"):
        assert needle.encode() not in raw, needle
    for uid in (original.ObservationUID, original.TrackingUID):
        assert uid.encode() not in raw
    ds = pydicom.dcmread(tmp_path / "out.dcm")
    assert "SeriesType" not in ds and "ProcedureCodeSequence" not in ds
    (lung,) = ds.AnatomicRegionSequence  # the local-scheme item is dropped
    # The standard meaning of the code (pydicom's dictionary) replaces the writer's text.
    assert (lung.CodeValue, lung.CodingSchemeDesignator) == ("39607008", "SCT")
    assert lung.CodeMeaning.startswith("Lung") and "MRN" not in lung.CodeMeaning
    # What describes the pixels is kept.
    assert (ds.Rows, ds.Columns, ds.PixelSpacing) == (
        original.Rows,
        original.Columns,
        original.PixelSpacing,
    )
    assert ds.PixelData == original.PixelData


def test_summary_never_names_input_files(tmp_path: Path) -> None:
    src = tmp_path / "Smith^John 1970-01-01"
    src.mkdir()
    (src / "DOE_JANE_MRN778899.dcm").write_bytes(_planted())
    (src / "Roe_Richard.txt").write_text("not DICOM")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "deid", str(src), str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"] == 1 and summary["failed"] == [
        {"index": 1, "error": "not DICOM: InvalidDicomError"}
    ]
    for name in ("Smith", "1970", "DOE", "JANE", "778899", "Roe", "Richard"):
        assert name not in proc.stdout + proc.stderr, name


def _ultrasound(tmp_path: Path) -> Path:
    images, _ = load_samples()
    ds = pydicom.dcmread(io.BytesIO(radiograph(images[0], study_uid=generate_uid(), modality="US")))
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Sono 1"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    path = tmp_path / "us.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_burned_in_text_blanked_by_a_rule_from_the_table(tmp_path: Path) -> None:
    src = _ultrasound(tmp_path)
    rules_file = tmp_path / "rules.csv"
    rules_file.write_text(
        "# test rules\nmodality,manufacturer,model,rows,columns,regions\n"
        "US,acme,*,*,*,0 0 20 10; 5 20 8 25\n"
        "US,OTHER,*,*,*,0 0 1 1\n"
    )
    rules = deid.load_burn_in_rules(rules_file)
    original = pydicom.dcmread(src).pixel_array
    assert original[:10, :20].any()  # there is something to blank
    summary = deid.deidentify_path(src, tmp_path / "out.dcm", burn_in_rules=rules).summary()
    assert summary["refused"] == [] and summary["files"] == 1
    assert summary["burned_in_cleaned"] == [{"output": "out.dcm", "rule": "US/acme/*/*x*"}]
    ds = pydicom.dcmread(tmp_path / "out.dcm")
    pixels = ds.pixel_array
    assert not pixels[:10, :20].any() and not pixels[20:25, 5:8].any()
    untouched = np.ones(pixels.shape, bool)
    untouched[:10, :20] = untouched[20:25, 5:8] = False
    assert np.array_equal(pixels[untouched], original[untouched])
    assert ds.BurnedInAnnotation == "NO"
    codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113101"]


def test_burned_in_text_without_a_rule_is_refused(tmp_path: Path) -> None:
    src = _ultrasound(tmp_path)
    summary = deid.deidentify_path(src, tmp_path / "out.dcm", burn_in_rules=[]).summary()
    (refusal,) = summary["refused"]
    assert "burned-in text" in refusal["reason"] and refusal["modality"] == "US"
    assert not (tmp_path / "out.dcm").exists()


@pytest.mark.parametrize(
    "table", ["annex_e_basic.csv", "safe_attributes.csv", "burned_in_rules.csv"]
)
def test_tables_ship_with_the_package(table: str) -> None:
    assert (deid.TABLES / table).is_file()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"privacy/deid_tables/*.csv"' in pyproject
    # Each attribute has one home: the Annex E table or the safe list.
    assert not deid.SAFE & set(deid.RECIPE)
