"""Model outputs → labels, confidences, findings at the model's operating point.

A model's stated operating point (``model_repository/<model>/operating_point.json``: its
positive labels and target sensitivity) and the threshold derived for each version on
validation images put through the DICOM pipeline (``<version>/gate.json``) decide what a
positive finding is: the summed probability of the positive labels at or above that
threshold. A model's attention map (an output named by the config's ``attention_output``
parameter) is kept with the result for the reviewer's overlay, never turned into locations:
the models were not validated for localisation (their data has no location labels).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.inference.specs import ModelSpec

# Labels that are never findings, whatever the model set.
NORMAL_LABELS = frozenset({"normal"})
# Said with every attention map a result carries (reports, SR, webhooks, the review page).
ATTENTION_QUALIFIER = "model attention, not validated for localisation"


def top_class(probs: np.ndarray, labels: tuple[str, ...]) -> tuple[str, float]:
    index = int(np.argmax(probs))
    label = labels[index] if index < len(labels) else str(index)
    return label, float(probs[index])


def entropy(probs: np.ndarray) -> float:
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())


def positive_labels(spec: ModelSpec) -> tuple[str, ...]:
    """The operating point's positive labels; without one, every label that is not normal."""
    stated = spec.operating_point.get("positive_labels")
    if stated:
        return tuple(str(label) for label in stated)
    return tuple(label for label in spec.labels if label not in NORMAL_LABELS)


def operating_threshold(spec: ModelSpec, version: int) -> float | None:
    """The version's derived threshold on the positive score (gate.json), if it has one."""
    op = spec.gates.get(version, {}).get("operating_point") or {}
    value = op.get("threshold")
    return float(value) if isinstance(value, int | float) else None


def positive_score(spec: ModelSpec, probs: np.ndarray) -> float:
    index = {label: i for i, label in enumerate(spec.labels)}
    return float(
        sum(float(probs[index[label]]) for label in positive_labels(spec) if label in index)
    )


def is_positive(spec: ModelSpec, version: int, probs: np.ndarray) -> bool:
    """Positive at the operating point; without a derived threshold, when the top class is a
    positive label (never silently negative)."""
    threshold = operating_threshold(spec, version)
    if threshold is None:
        return top_class(probs, spec.labels)[0] in positive_labels(spec)
    return positive_score(spec, probs) >= threshold


def describe(
    spec: ModelSpec, version: int, outputs: dict[str, np.ndarray], i: int
) -> tuple[str, float, list[dict[str, Any]]]:
    """(label, confidence, findings) of row ``i`` of a response."""
    probs = outputs[spec.probs_output][i]
    positive = is_positive(spec, version, probs)
    # The label is the decision at the operating point: the likeliest label of the side the
    # threshold puts the image on (a pneumonia score of 0.3 over a threshold of 0.2 is
    # "pneumonia", not "normal 0.7").
    wanted = set(positive_labels(spec))
    side = [k for k, name in enumerate(spec.labels) if (name in wanted) == positive]
    best = max(side, key=lambda k: float(probs[k])) if side else int(np.argmax(probs))
    label = spec.labels[best] if best < len(spec.labels) else str(best)
    confidence = float(probs[best])
    found: list[dict[str, Any]] = []
    if positive:
        finding: dict[str, Any] = {
            "code": "+".join(positive_labels(spec)),
            "probability": round(positive_score(spec, probs), 4),
            "operating_point": operating_threshold(spec, version),
        }
        if spec.attention_output and spec.attention_output in outputs:
            finding["attention"] = ATTENTION_QUALIFIER
        found.append(finding)
    return label, confidence, found
