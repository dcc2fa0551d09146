"""torch vs ONNX Runtime parity for every committed version, from the committed weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import data
from training.nets import ARCHITECTURES, AnalysisExport, CamNet, TriageExport
from training.train import weights_path

REPO = Path(__file__).resolve().parents[2] / "model_repository"
# Probabilities agree to ~1e-6; the heatmap is divided by its per-image peak, which can
# magnify float32 rounding to a few 1e-5 on single cells.
PARITY_ATOL = 1e-4
SAMPLES = 256


@pytest.mark.parametrize(
    ("model", "version"),
    [("triage", 1), ("triage", 2), ("analysis", 1), ("analysis", 2)],
    ids=["triage-v1", "triage-v2", "analysis-v1", "analysis-v2"],
)
def test_torch_and_onnxruntime_agree(model: str, version: int) -> None:
    saved = torch.load(weights_path(model, version), weights_only=True)
    net = CamNet(**ARCHITECTURES[saved["arch"]])  # type: ignore[arg-type]
    net.load_state_dict(saved["state_dict"])
    wrapper = (AnalysisExport if model == "analysis" else TriageExport)(
        net.eval(), float(saved["temperature"])
    ).eval()
    x = data.load()["test"].x[:SAMPLES]
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(x))
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    session = ort.InferenceSession(
        str(REPO / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"image": x})
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=PARITY_ATOL)
