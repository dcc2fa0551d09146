"""torch vs ONNX Runtime parity for every committed version, from the committed weights:
every output (probs, heatmap, ood_score)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from orchestrator.inference.specs import load_repository
from training import data
from training.nets import OodHead, ServingExport
from training.train import make_net, weights_path

REPO = Path(__file__).resolve().parents[2] / "model_repository"
VERSIONS = [(m, v) for m, s in sorted(load_repository(REPO).items()) for v in s.versions]
# Probabilities agree to ~1e-6; the heatmap is divided by its per-image peak and the OOD
# score is a sum of squares, which magnify float32 rounding to a few 1e-5 (relative).
PARITY_RTOL = 1e-4
SAMPLES = 256


@pytest.mark.parametrize(("model", "version"), VERSIONS, ids=[f"{m}-v{v}" for m, v in VERSIONS])
def test_torch_and_onnxruntime_agree(model: str, version: int) -> None:
    saved = torch.load(weights_path(model, version), weights_only=True)
    net = make_net(saved["arch"], saved["in_channels"], saved["classes"])
    net.load_state_dict(saved["state_dict"])
    o = saved["ood"]
    head = OodHead(o["chol"], o["means"], list(o["scales"]), o.get("linear"))
    wrapper = ServingExport(
        net.eval(), float(saved["temperature"]), head, attention=bool(saved["attention"])
    ).eval()
    x = data.load(model)["test"].x[:SAMPLES]
    # One thread each: a parallel reduction sums the OOD score's ~5e7-sized squares in an order
    # that varies run to run (a CI run once saw 2e-4 relative); one thread is repeatable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(torch.from_numpy(x))]
    finally:
        torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(REPO / model / str(version) / "model.onnx"),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    got = session.run(None, {"image": x})
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(g, e, atol=PARITY_RTOL * scale)
