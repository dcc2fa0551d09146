"""Every committed model version: ONNX Runtime on the test split reproduces its card's
figures; outputs honour the config's contract (probs, [heatmap], ood_score); gate.json is
present, sane and reproduces on the validation split through the DICOM pipeline. No torch."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from orchestrator.inference.specs import load_repository, read_model_config
from training import data, metrics, ood_eval, pipeline_path

REPO = Path(__file__).resolve().parents[2] / "model_repository"
SPECS = load_repository(REPO)
VERSIONS = [(model, version) for model, spec in sorted(SPECS.items()) for version in spec.versions]
IDS = [f"{m}-v{v}" for m, v in VERSIONS]
# ORT's thread scheduling may flip the last float bit; the card's figures are rounded to 1e-4.
CARD_TOLERANCE = 1e-3


@cache
def _split(model: str, split: str) -> data.Split:
    return data.load(model)[split]


@cache
def _session(model: str, version: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(REPO / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _run(model: str, version: int, x: np.ndarray) -> list[np.ndarray]:
    session = _session(model, version)
    outs = [session.run(None, {"image": x[i : i + 256]}) for i in range(0, len(x), 256)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def _gate(model: str, version: int) -> dict:
    return json.loads((REPO / model / str(version) / "gate.json").read_text())


def test_model_sets_and_versions() -> None:
    counts = {m: len(s.versions) for m, s in SPECS.items()}
    assert counts["triage"] >= 2 and counts["analysis"] >= 2, counts
    assert counts["breast_us"] >= 1 and counts["fundus"] >= 1, counts


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=IDS)
def test_card_figures_reproduce_on_the_test_split(model: str, version: int) -> None:
    card = json.loads((REPO / model / str(version) / "card.json").read_text())
    test = _split(model, "test")
    probs = _run(model, version, test.x)[0]
    figures = metrics.summary(probs, test.y)
    for key in ("acc", "auc", "ece"):
        assert figures[key] == pytest.approx(card["test"][key], abs=CARD_TOLERANCE), key
        direct = card["test_paths"]["direct"]["figures"][key]
        assert figures[key] == pytest.approx(direct, abs=CARD_TOLERANCE), key
    assert max(card["parity_max_rel_diff"].values()) < 1e-4
    assert (REPO / model / str(version) / "MODEL_CARD.md").is_file()
    reference = json.loads((REPO / model / str(version) / "reference.json").read_text())
    assert sum(reference["counts"]) == reference["n"]


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=IDS)
@pytest.mark.parametrize("batch", [1, 7])
def test_outputs_honour_the_config_contract(model: str, version: int, batch: int) -> None:
    spec = SPECS[model]
    outputs = _session(model, version).run(None, {"image": _split(model, "test").x[:batch]})
    assert len(outputs) == len(spec.outputs)
    for tensor, value in zip(spec.outputs, outputs, strict=True):
        assert value.shape == (batch, *tensor.dims)
        assert value.dtype == np.float32
    np.testing.assert_allclose(outputs[0].sum(axis=1), 1.0, atol=1e-5)
    params = read_model_config(REPO / model / "config.pbtxt").parameters
    ood = outputs[[t.name for t in spec.outputs].index(params["ood_output"].string_value)]
    assert np.all(np.isfinite(ood)) and np.all(ood >= 0.0)
    if model == "analysis":
        heat = outputs[
            [t.name for t in spec.outputs].index(params["attention_output"].string_value)
        ]
        assert heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=IDS)
def test_gate_is_sane_and_states_the_configured_operating_point(model: str, version: int) -> None:
    gate = _gate(model, version)
    stated = json.loads((REPO / model / "operating_point.json").read_text())
    op = gate["operating_point"]
    assert op["positive_labels"] == stated["positive_labels"]
    assert op["target_sensitivity"] == stated["target_sensitivity"]
    assert stated["auto_finalise_positive"] is False
    labels = (REPO / model / "labels.txt").read_text().split()
    assert set(op["positive_labels"]) <= set(labels)
    assert math.isfinite(op["threshold"]) and 0.0 < op["threshold"] < 1.0
    assert op["val_sensitivity"] >= op["target_sensitivity"]
    assert math.isfinite(gate["ood"]["threshold"]) and gate["ood"]["threshold"] > 0.0
    assert 0.0 < gate["ood"]["val_false_flag_rate"] <= 0.03


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=IDS)
def test_gate_reproduces_on_validation_through_the_dicom_pipeline(model: str, version: int) -> None:
    """At 512 px (the cheapest film size): recomputing the OOD false-flag rate and the
    operating point's sensitivity from the ONNX outputs matches gate.json."""
    gate = _gate(model, version)
    ds = data.dataset_of(model)
    spec, shape = data.model_spec(model)
    raw = data.load_raw(ds.name)["val"]
    x = pipeline_path.tensors(ds.builder, raw.images, (512, 512), spec, shape)
    outs = _run(model, version, x)
    ood = outs[-1][:, 0]
    rate = float((ood > gate["ood"]["threshold"]).mean())
    assert rate == pytest.approx(gate["ood"]["val_false_flag_rate_by_path"]["512"], abs=2 / len(x))
    labels = (REPO / model / "labels.txt").read_text().split()
    positive = [labels.index(p) for p in gate["operating_point"]["positive_labels"]]
    truth = np.isin(raw.y, positive)
    flagged = metrics.positive_score(outs[0], positive) >= gate["operating_point"]["threshold"]
    sens, _ = metrics.sens_spec(flagged, truth)
    # The threshold was set on three film sizes pooled; 512 alone lands near the target.
    assert sens >= gate["operating_point"]["target_sensitivity"] - 0.05


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=IDS)
def test_blank_frames_are_out_of_distribution(model: str, version: int) -> None:
    spec, shape = data.model_spec(model)
    ood = _run(model, version, ood_eval.blank_frames(spec, shape))[-1][:, 0]
    assert (ood > _gate(model, version)["ood"]["threshold"]).all(), ood
