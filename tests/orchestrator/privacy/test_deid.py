"""De-identification (orchestrator/privacy/deid.py): the PS3.15 Annex E basic profile on synthetic
radiographs with 20 identifying values planted, UIDs remapped consistently within a study,
pixels untouched, burned-in annotation flagged, and ``medtriage deid`` end to end."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from orchestrator.privacy import deid
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT

CODE_BASIC_PROFILE = "113100"
INSTANCES = 3


def _with_extras(data: bytes) -> bytes:
    """A private block, an overlay plane and a curve: all three must go."""
    ds = pydicom.dcmread(io.BytesIO(data))
    block = ds.private_block(0x0011, "ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", "PRIVATE-PHI-SECRET")
    ds.add_new(0x60000010, "US", 4)  # Overlay Rows
    ds.add_new(0x60000011, "US", 4)  # Overlay Columns
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 8)  # Overlay Data
    ds.add_new(0x50000010, "US", 1)  # a retired curve
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.add_new(0x00290010, "LO", "NESTED PRIVATE")
    ds.DerivationCodeSequence = [item]  # kept; its UIDs are remapped, its private tags go
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def study(tmp_path: Path, phi_radiograph: Any) -> tuple[Path, list[dict[str, str]]]:
    """INSTANCES planted instances of one study and series, in nested folders, plus junk."""
    images, _ = load_samples()
    study_uid, series_uid = generate_uid(), generate_uid()
    src = tmp_path / "in"
    planted = []
    for i in range(INSTANCES):
        data, values = phi_radiograph(images[i], study_uid, series_uid)
        path = src / f"series{i % 2}" / f"{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_with_extras(data))
        planted.append(values)
    (src / "notes.txt").write_text(f"not DICOM {planted[0]['PatientName']}")
    return src, planted


def _read_all(root: Path) -> dict[str, Dataset]:
    return {str(p.relative_to(root)): pydicom.dcmread(p) for p in sorted(root.rglob("*.dcm"))}


def _check_clean(src: Path, out: Path, planted: list[dict[str, str]]) -> dict[str, Dataset]:
    before, after = _read_all(src), _read_all(out)
    assert len(after) == len(before)
    assert [p for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm"] == []
    every_value = {v for values in planted for v in values.values()}
    # Outputs are laid out by the new UIDs; input names and folders are not carried over.
    sources = {ds.PixelData: name for name, ds in before.items()}
    for name, ds in after.items():
        assert name == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        original = before[sources[ds.PixelData]]
        raw = (out / name).read_bytes()
        found = sorted(v for v in every_value if v.encode() in raw)
        assert found == [], f"{name}: planted values left: {found}"
        assert b"PRIVATE-PHI-SECRET" not in raw and b"NESTED PRIVATE" not in raw
        for keyword in planted[0]:
            action = deid.RECIPE[keyword]
            if action == deid.REMOVE:
                assert keyword not in ds, keyword
            elif action == deid.ZERO:
                assert keyword in ds and ds.data_element(keyword).value in ("", None), keyword
            else:
                assert action == deid.UID, keyword
                assert str(ds.data_element(keyword).value).startswith("2.25."), keyword
        assert not any(e.tag.is_private for e in ds.iterall())
        assert not [e for e in ds if e.tag.group in (0x5000, 0x6000)]
        assert ds.PatientIdentityRemoved == "YES"
        (code,) = ds.DeidentificationMethodCodeSequence
        assert (code.CodeValue, code.CodingSchemeDesignator) == (CODE_BASIC_PROFILE, "DCM")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # Pixels byte for byte (they paired the files), and the attributes that describe them.
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (
            original.Rows,
            original.Columns,
            original.BitsStored,
        )
        # The nested reference follows its instance's new UID.
        (ref,) = ds.DerivationCodeSequence
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == original.SOPClassUID
    return after


def test_basic_profile_cleans_a_study_consistently(
    tmp_path: Path, study: tuple[Path, list[dict[str, str]]]
) -> None:
    src, planted = study
    assert len(planted[0]) == 20
    result = deid.deidentify_path(src, tmp_path / "out")
    after = _check_clean(src, tmp_path / "out", planted)

    # One study and one series before -> one study and one series after; instances distinct.
    assert len({ds.StudyInstanceUID for ds in after.values()}) == 1
    assert len({ds.SeriesInstanceUID for ds in after.values()}) == 1
    assert len({ds.SOPInstanceUID for ds in after.values()}) == INSTANCES
    summary = result.summary()
    assert summary["files"] == INSTANCES
    # Known by its place in the sorted listing (notes.txt comes first), never by its name.
    assert summary["failed"] == [{"index": 0, "error": "not DICOM: InvalidDicomError"}]
    # study + series + one SOP instance per file
    assert summary["uids_remapped"] == 2 + INSTANCES
    assert summary["refused"] == [] and summary["burned_in_cleaned"] == []  # CR: no text
    assert planted[0]["PatientName"] not in json.dumps(summary)
    assert "notes" not in json.dumps(summary) and "series0" not in json.dumps(summary)


def test_uid_replacement_is_keyed_and_deterministic() -> None:
    old = generate_uid()
    a, b = deid.Deidentifier(b"k" * 32), deid.Deidentifier(b"k" * 32)
    assert a.new_uid(old) == b.new_uid(old) == a.new_uid(old)
    assert deid.Deidentifier(b"j" * 32).new_uid(old) != a.new_uid(old)
    assert a.new_uid(old) != a.new_uid(generate_uid())
    new = a.new_uid(old)
    assert new.startswith("2.25.") and len(new) <= 64 and old not in new
    # Without a key every run draws its own: the mapping is not reproducible by others.
    assert deid.Deidentifier().new_uid(old) != deid.Deidentifier().new_uid(old)


@pytest.mark.parametrize(
    ("modality", "declared", "sc", "expected"),
    [
        ("CR", None, False, "NO"),
        ("US", None, False, "unknown"),
        ("CR", "YES", False, "YES"),
        ("US", "NO", False, "NO"),
        ("OT", None, True, "unknown"),
    ],
    ids=["cr-undeclared", "us-undeclared", "cr-declared-yes", "us-declared-no", "sc-undeclared"],
)
def test_burned_in_annotation_refused_unless_cleaned(
    tmp_path: Path, modality: str, declared: str | None, sc: bool, expected: str
) -> None:
    images, _ = load_samples()
    ds = pydicom.dcmread(
        io.BytesIO(radiograph(images[0], study_uid=generate_uid(), modality=modality))
    )
    if declared:
        ds.BurnedInAnnotation = declared
    if sc:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    summary = deid.deidentify_path(tmp_path / "x.dcm", tmp_path / "y.dcm").summary()
    if expected == "NO":
        assert summary["refused"] == [] and summary["files"] == 1
        assert pydicom.dcmread(tmp_path / "y.dcm").PatientIdentityRemoved == "YES"
        return
    # Never exported as if clean: refused, with the reason, and nothing written.
    (refusal,) = summary["refused"]
    assert refusal["index"] == 0 and refusal["modality"] == modality
    assert "burned-in text" in refusal["reason"] and "no rule" in refusal["reason"]
    assert ("YES" if expected == "YES" else "not declared") in refusal["reason"]
    assert summary["files"] == 0 and not (tmp_path / "y.dcm").exists()


def test_cli_deid_end_to_end(tmp_path: Path, study: tuple[Path, list[dict[str, str]]]) -> None:
    src, planted = study
    out = tmp_path / "cli-out"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "deid", str(src), str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"] == INSTANCES and len(summary["failed"]) == 1
    _check_clean(src, out, planted)
    every_value = [v for values in planted for v in values.values()]
    assert not [v for v in every_value if v in proc.stdout + proc.stderr]


GOLDEN = [
    ("CT_small.dcm", "NO"),
    ("MR_small.dcm", "NO"),
    ("rtplan.dcm", "NO"),
    ("rtdose.dcm", "NO"),
    ("rtstruct.dcm", "NO"),  # no preamble or file meta
    ("waveform_ecg.dcm", "NO"),
    ("ExplVR_BigEnd.dcm", "unknown"),  # ultrasound, big endian
    ("JPEG2000.dcm", "unknown"),  # a Secondary Capture
    ("SC_jpeg_no_color_transform.dcm", "unknown"),
]


def _strings(ds: Dataset) -> list[tuple[str, str, str]]:
    """(keyword, VR, value) of every text value at every level, file meta included."""
    out = []
    meta = getattr(ds, "file_meta", None)
    for elem in [*ds.iterall(), *(meta.iterall() if meta is not None else [])]:
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value is None:
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        out += [(elem.keyword, elem.VR, str(v)) for v in values if str(v)]
    return out


@pytest.mark.parametrize(("name", "burned_in"), GOLDEN, ids=[n for n, _ in GOLDEN])
def test_pydicom_test_files(tmp_path: Path, name: str, burned_in: str) -> None:
    src = Path(str(get_testdata_file(name)))
    original = pydicom.dcmread(src, force=True)
    result = deid.deidentify_path(src, tmp_path / name).summary()
    assert result["failed"] == []
    if burned_in != "NO":  # may show text, no rule cleans it: refused, not written
        assert result["files"] == 0 and len(result["refused"]) == 1
        assert not (tmp_path / name).exists()
        return
    assert result["files"] == 1 and result["refused"] == []
    ds = pydicom.dcmread(tmp_path / name, force=True)
    assert ds.PatientIdentityRemoved == "YES"
    assert not any(e.tag.is_private or e.tag.group in (0x5000, 0x6000) for e in ds.iterall())
    for elem in ds.iterall():
        action = deid.RECIPE.get(elem.keyword, deid.KEEP)
        assert action != deid.REMOVE, elem.keyword
        if action == deid.ZERO or elem.VR in ("DA", "DT", "TM"):
            assert elem.value in ("", None) or len(elem.value) == 0, elem.keyword
        if action == deid.UID and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            assert all(str(v).startswith("2.25.") for v in values), elem.keyword
    if "PixelData" in original:
        assert ds.PixelData == original.PixelData
    # No identifying value of the original is anywhere in the output's bytes, unless it is
    # also (part of) a value that is kept on purpose (a manufacturer, pydicom's own UID root).
    kept = [v for k, _, v in _strings(original) + _strings(ds) if deid.RECIPE.get(k, "K") == "K"]
    raw = (tmp_path / name).read_bytes()
    identifying = {
        v
        for k, vr, v in _strings(original)
        if (deid.RECIPE.get(k, "K") != "K" or vr in ("DA", "DT", "TM")) and len(v) >= 6
    }
    left = [v for v in identifying if v.encode() in raw and not any(v in k for k in kept)]
    assert left == [], left


def test_fragments_and_junk_are_refused_not_copied(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("nested_priv_SQ.dcm", "priv_SQ.dcm"):  # datasets without a SOP Class
        (src / name).write_bytes(Path(str(get_testdata_file(name))).read_bytes())
    (src / "junk.dcm").write_bytes(b"\x00" * 10 + b"Smith^John 19700101")
    summary = deid.deidentify_path(src, tmp_path / "out").summary()
    assert summary["files"] == 0 and len(summary["failed"]) == 3
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
