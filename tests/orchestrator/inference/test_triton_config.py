"""Reading model_repository/<model>/config.pbtxt into ModelSpec (no server needed)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.inference.specs import (
    ModelConfigError,
    ModelSpec,
    TensorSpec,
    load_model_spec,
    load_repository,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
IMAGE = TensorSpec("image", "FP32", (1, 28, 28))
PROBS = TensorSpec("probs", "FP32", (2,), "labels.txt")
HEATMAP = TensorSpec("heatmap", "FP32", (7, 7))
OOD = TensorSpec("ood_score", "FP32", (1,))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the real repository that a test may break."""
    dest = tmp_path / "model_repository"
    shutil.copytree(MODEL_REPOSITORY, dest)
    return dest


@pytest.mark.parametrize(
    ("name", "outputs"),
    [("triage", (PROBS, OOD)), ("analysis", (PROBS, HEATMAP, OOD))],
    ids=["triage", "analysis"],
)
def test_real_configs(name: str, outputs: tuple[TensorSpec, ...]) -> None:
    spec = load_model_spec(MODEL_REPOSITORY, name)

    assert spec.name == name
    assert spec.max_batch_size == 32
    assert spec.inputs == (IMAGE,)
    assert spec.outputs == outputs
    assert spec.labels == ("normal", "pneumonia")
    assert (spec.priority_levels, spec.default_priority_level) == (2, 2)
    assert spec.preprocess["mean"] == 0.5 and spec.preprocess["std"] == 0.5
    assert 1 in spec.versions
    assert spec.output("probs") is spec.outputs[0]
    # The roles of the extra outputs are named in the config, the code reads them.
    assert spec.ood_output == "ood_score" and spec.probs_output == "probs"
    assert spec.attention_output == ("heatmap" if name == "analysis" else None)
    for version in spec.versions:
        assert spec.gates[version]["ood"]["threshold"] > 0
        assert 0 < spec.gates[version]["operating_point"]["threshold"] < 1
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        spec.output("nope")


def test_load_repository_reads_every_model() -> None:
    models = load_repository(MODEL_REPOSITORY)

    assert set(models) == {"triage", "analysis", "breast_us", "fundus"}
    assert all(isinstance(spec, ModelSpec) for spec in models.values())


def test_versions_are_numeric_directories_on_disk(repo: Path) -> None:
    for name in ("3", "10", "latest", "2.bak"):
        (repo / "triage" / name).mkdir(exist_ok=True)
    (repo / "triage" / "7").write_text("a file, not a version")

    assert load_model_spec(repo, "triage").versions == (1, 2, 3, 10)


def test_datatypes_use_triton_wire_names(repo: Path) -> None:
    config = repo / "triage" / "config.pbtxt"
    text = config.read_text().replace("TYPE_FP32", "TYPE_STRING", 1)
    config.write_text(text.replace("dims: [ 2 ]", "dims: [ -1 ]"))

    spec = load_model_spec(repo, "triage")
    assert spec.inputs[0].datatype == "BYTES"
    assert spec.outputs[0] == TensorSpec("probs", "FP32", (-1,), "labels.txt")


def test_no_preprocess_and_no_labels(repo: Path) -> None:
    (repo / "triage" / "preprocess.json").unlink()
    config = repo / "triage" / "config.pbtxt"
    config.write_text(config.read_text().replace('label_filename: "labels.txt"', ""))

    spec = load_model_spec(repo, "triage")
    assert spec.preprocess == {}
    assert spec.labels == ()


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda t: t.replace("max_batch_size: 32", "max_batch_size: 32 }"), "not a valid"),
        (lambda t: t.replace("max_batch_size", "max_batch_sz"), "not a valid"),
        (lambda t: t.replace("TYPE_FP32", "TYPE_FLOAT32", 1), "not a valid"),
        (lambda t: t.replace('name: "triage"', 'name: "other"'), "does not match"),
        (lambda t: t.replace("data_type: TYPE_FP32\n    dims: [ 1, 28, 28 ]", ""), "data_type"),
        (lambda t: t.replace('label_filename: "labels.txt"', 'label_filename: "x"'), "label"),
    ],
    ids=["syntax", "unknown-field", "unknown-enum", "name-mismatch", "no-dtype", "no-label-file"],
)
def test_broken_config_names_the_file(repo: Path, edit: Callable[[str], str], reason: str) -> None:
    config = repo / "triage" / "config.pbtxt"
    config.write_text(edit(config.read_text()))

    with pytest.raises(ModelConfigError, match=reason) as info:
        load_model_spec(repo, "triage")
    assert info.value.path.parent == repo / "triage"
    assert str(info.value.path) in str(info.value)


def test_missing_config(repo: Path) -> None:
    with pytest.raises(ModelConfigError, match="no such file") as info:
        load_model_spec(repo, "absent")
    assert info.value.path == repo / "absent" / "config.pbtxt"


def test_invalid_preprocess_json(repo: Path) -> None:
    (repo / "analysis" / "preprocess.json").write_text("{mean: 0.5")

    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_model_spec(repo, "analysis")


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_repository(tmp_path / "nowhere")
