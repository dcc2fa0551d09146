from __future__ import annotations

import numpy as np

from orchestrator.findings import analysis_findings, entropy, top_class, zones

LABELS = ("normal", "pneumonia")


def test_top_class_and_entropy() -> None:
    assert top_class(np.array([0.2, 0.8]), LABELS) == ("pneumonia", 0.8)
    assert entropy(np.array([0.5, 0.5])) > entropy(np.array([0.99, 0.01]))


def test_zones_split_the_map_into_six_lung_zones() -> None:
    heat = np.zeros((7, 7), dtype=np.float32)
    heat[5:, :3] = 1.0  # lower rows, image-left = patient right
    per_zone = zones(heat)
    assert len(per_zone) == 6
    assert max(per_zone, key=per_zone.__getitem__) == "right_lower"


def test_findings_only_above_threshold_and_with_zones() -> None:
    heat = np.zeros((7, 7), dtype=np.float32)
    heat[:2, 4:] = 1.0
    found = analysis_findings(np.array([0.1, 0.9]), heat, LABELS)
    assert [f["code"] for f in found] == ["pneumonia"]
    assert found[0]["zones"][0] == "left_upper"
    assert analysis_findings(np.array([0.9, 0.1]), heat, LABELS) == []
