"""Findings at the model's stated operating point (unit, no services)."""

from __future__ import annotations

import dataclasses

import numpy as np

from orchestrator.inference.specs import ModelSpec, TensorSpec
from orchestrator.triage.findings import (
    ATTENTION_QUALIFIER,
    describe,
    entropy,
    is_positive,
    operating_threshold,
    positive_labels,
    top_class,
)

LABELS = ("normal", "pneumonia")


def _spec(threshold: float | None = 0.2, attention: bool = True) -> ModelSpec:
    outputs = [TensorSpec("probs", "FP32", (2,), "labels.txt")]
    if attention:
        outputs.append(TensorSpec("heatmap", "FP32", (7, 7)))
    gates = {1: {"operating_point": {"threshold": threshold}}} if threshold is not None else {1: {}}
    return ModelSpec(
        name="analysis",
        max_batch_size=8,
        inputs=(TensorSpec("image", "FP32", (1, 28, 28)),),
        outputs=tuple(outputs),
        labels=LABELS,
        versions=(1,),
        parameters={"attention_output": "heatmap"} if attention else {},
        operating_point={"positive_labels": ["pneumonia"], "target_sensitivity": 0.97},
        gates=gates,
    )


def test_top_class_and_entropy() -> None:
    assert top_class(np.array([0.2, 0.8]), LABELS) == ("pneumonia", 0.8)
    assert entropy(np.array([0.5, 0.5])) > entropy(np.array([0.99, 0.01]))


def test_positive_at_the_operating_point_not_at_the_argmax() -> None:
    spec = _spec(threshold=0.2)
    assert operating_threshold(spec, 1) == 0.2 and positive_labels(spec) == ("pneumonia",)
    # P(pneumonia) 0.3 is below the argmax but above the derived threshold: positive.
    outputs = {"probs": np.array([[0.7, 0.3]]), "heatmap": np.zeros((1, 7, 7))}
    label, confidence, found = describe(spec, 1, outputs, 0)
    assert (label, confidence) == ("pneumonia", 0.3)
    assert found == [
        {
            "code": "pneumonia",
            "probability": 0.3,
            "operating_point": 0.2,
            "attention": ATTENTION_QUALIFIER,
        }
    ]
    negative = {"probs": np.array([[0.9, 0.1]]), "heatmap": np.zeros((1, 7, 7))}
    assert describe(spec, 1, negative, 0) == ("normal", 0.9, [])


def test_no_zone_findings_ever() -> None:
    outputs = {"probs": np.array([[0.01, 0.99]]), "heatmap": np.ones((1, 7, 7))}
    (finding,) = describe(_spec(), 1, outputs, 0)[2]
    assert "zones" not in finding and "zone_activation" not in finding


def test_without_a_derived_threshold_the_top_class_decides() -> None:
    spec = _spec(threshold=None, attention=False)
    assert is_positive(spec, 1, np.array([0.4, 0.6]))
    assert not is_positive(spec, 1, np.array([0.6, 0.4]))
    # A spec with no stated operating point: every non-normal label is positive.
    bare = dataclasses.replace(spec, operating_point={})
    assert positive_labels(bare) == ("pneumonia",)
