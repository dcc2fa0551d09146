"""Every committed model version: ONNX Runtime on the test split reproduces its card's
figures; outputs honour the config's contract; dynamic batch works. No torch here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from orchestrator.inference.specs import load_repository
from training import data, metrics

REPO = Path(__file__).resolve().parents[2] / "model_repository"
VERSIONS = [
    (model, version)
    for model, spec in sorted(load_repository(REPO).items())
    for version in spec.versions
]
# ORT's thread scheduling may flip the last float bit; the card's figures are rounded to 1e-4.
CARD_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def test_split() -> data.Split:
    return data.load()["test"]


def _session(model: str, version: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(REPO / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def test_at_least_two_versions_per_model() -> None:
    for model in ("triage", "analysis"):
        assert len([v for m, v in VERSIONS if m == model]) >= 2, VERSIONS


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=[f"{m}-v{v}" for m, v in VERSIONS])
def test_card_figures_reproduce_on_the_test_split(
    model: str, version: int, test_split: data.Split
) -> None:
    card = json.loads((REPO / model / str(version) / "card.json").read_text())
    session = _session(model, version)
    probs = np.concatenate(
        [
            session.run(None, {"image": test_split.x[i : i + 256]})[0]
            for i in range(0, len(test_split.x), 256)
        ]
    )
    figures = metrics.summary(probs, test_split.y)
    for key in ("acc", "auc", "ece"):
        assert figures[key] == pytest.approx(card["test"][key], abs=CARD_TOLERANCE), key
    assert card["parity_max_abs_diff"] < 1e-4
    assert (REPO / model / str(version) / "MODEL_CARD.md").is_file()
    reference = json.loads((REPO / model / str(version) / "reference.json").read_text())
    assert sum(reference["counts"]) == reference["n"] == card["n"]["val"]


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=[f"{m}-v{v}" for m, v in VERSIONS])
@pytest.mark.parametrize("batch", [1, 7])
def test_outputs_honour_the_config_contract(
    model: str, version: int, batch: int, test_split: data.Split
) -> None:
    spec = load_repository(REPO)[model]
    session = _session(model, version)
    outputs = session.run(None, {"image": test_split.x[:batch]})
    assert len(outputs) == len(spec.outputs)
    for tensor, value in zip(spec.outputs, outputs, strict=True):
        assert value.shape == (batch, *tensor.dims)
        assert value.dtype == np.float32
    np.testing.assert_allclose(outputs[0].sum(axis=1), 1.0, atol=1e-5)
    if model == "analysis":
        heat = outputs[1]
        assert heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6
