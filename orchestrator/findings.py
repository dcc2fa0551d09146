"""Model outputs → labels, confidences and findings.

The analysis model returns class probabilities and a 7×7 activation map for "pneumonia".
The map is summarised per lung zone (upper / middle / lower × image-left / image-right;
in a PA radiograph image-left is the patient's right).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A zone is reported when its mean activation reaches this value.
ZONE_ACTIVATION_THRESHOLD = 0.5
# Below this probability the analysis model reports no finding.
FINDING_PROBABILITY_THRESHOLD = 0.5
_ZONE_ROWS = ("upper", "middle", "lower")
_ZONE_COLS = ("right", "left")  # patient side, image-left first


def top_class(probs: np.ndarray, labels: tuple[str, ...]) -> tuple[str, float]:
    index = int(np.argmax(probs))
    label = labels[index] if index < len(labels) else str(index)
    return label, float(probs[index])


def entropy(probs: np.ndarray) -> float:
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())


def zones(heatmap: np.ndarray) -> dict[str, float]:
    rows = np.array_split(np.arange(heatmap.shape[0]), len(_ZONE_ROWS))
    cols = np.array_split(np.arange(heatmap.shape[1]), len(_ZONE_COLS))
    out: dict[str, float] = {}
    for rname, ridx in zip(_ZONE_ROWS, rows, strict=True):
        for cname, cidx in zip(_ZONE_COLS, cols, strict=True):
            out[f"{cname}_{rname}"] = round(float(heatmap[np.ix_(ridx, cidx)].mean()), 4)
    return out


def analysis_findings(
    probs: np.ndarray, heatmap: np.ndarray | None, labels: tuple[str, ...]
) -> list[dict[str, Any]]:
    findings: list[dict[str, Any]] = []
    for index, label in enumerate(labels):
        if label == "normal" or float(probs[index]) < FINDING_PROBABILITY_THRESHOLD:
            continue
        finding: dict[str, Any] = {"code": label, "probability": round(float(probs[index]), 4)}
        if heatmap is not None:
            per_zone = zones(heatmap)
            finding["zones"] = sorted(
                (z for z, v in per_zone.items() if v >= ZONE_ACTIVATION_THRESHOLD),
                key=lambda z: -per_zone[z],
            )
            finding["zone_activation"] = per_zone
        findings.append(finding)
    return findings
