"""Classification, calibration and operating-point figures, without torch (tests use them on
ONNX Runtime outputs), and bootstrap intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ECE_BINS = 15
BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of ``scores`` for ``y == 1`` (Mann-Whitney; ties averaged)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_classes(probs: np.ndarray, y: np.ndarray) -> float:
    """Binary: AUC of class 1; more classes: mean one-vs-rest AUC (as MedMNIST reports)."""
    if probs.shape[1] == 2:
        return auc(probs[:, 1], y)
    return float(
        np.mean([auc(probs[:, k], (y == k).astype(np.int64)) for k in range(probs.shape[1])])
    )


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(total)


def summary(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        "acc": round(accuracy(probs, y), 4),
        "auc": round(auc_classes(probs, y), 4),
        "ece": round(ece(probs, y), 4),
    }


def positive_score(probs: np.ndarray, positive: Sequence[int]) -> np.ndarray:
    return np.asarray(probs[:, list(positive)].sum(1))


def sens_spec(flag: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return float(flag[truth].mean()), float((~flag[~truth]).mean())


def ppv_npv(sens: float, spec: float, prevalence: float) -> tuple[float, float]:
    tp, fn = sens * prevalence, (1 - sens) * prevalence
    tn, fp = spec * (1 - prevalence), (1 - spec) * (1 - prevalence)
    return (
        float(tp / (tp + fp)) if tp + fp > 0 else float("nan"),
        float(tn / (tn + fn)) if tn + fn > 0 else float("nan"),
    )


def threshold_for_sensitivity(score: np.ndarray, truth: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity (score >= t among positives) >= target."""
    pos = np.sort(score[truth])[::-1]
    k = int(np.ceil(target * len(pos)))  # this many positives must be at or above t
    return float(pos[max(k, 1) - 1])


def figures(
    probs: np.ndarray,
    y: np.ndarray,
    positive: Sequence[int],
    threshold: float,
    prevalence: float,
) -> dict[str, float]:
    """Everything the card reports for one path: ACC, AUC, ECE, sensitivity, specificity and
    PPV/NPV at ``prevalence`` (positive = summed positive-label probability ≥ 0.5), and at the
    operating point (≥ ``threshold``) its sensitivity, specificity and review rate."""
    truth = np.isin(y, list(positive))
    score = positive_score(probs, positive)
    sens, spec = sens_spec(score >= 0.5, truth)
    ppv, npv = ppv_npv(sens, spec, prevalence)
    op_flag = score >= threshold
    op_sens, op_spec = sens_spec(op_flag, truth)
    return {
        "acc": accuracy(probs, y),
        "auc": auc_classes(probs, y),
        "ece": ece(probs, y),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "op_sensitivity": op_sens,
        "op_specificity": op_spec,
        "op_review_rate": float(op_flag.mean()),
    }


def bootstrap(
    fn: Callable[[np.ndarray], dict[str, float]], n: int, reps: int = BOOTSTRAP
) -> dict[str, list[float]]:
    """Percentile 95 % intervals of every figure ``fn(indices)`` returns."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    samples: dict[str, list[float]] = {}
    for _ in range(reps):
        for k, v in fn(rng.integers(0, n, n)).items():
            samples.setdefault(k, []).append(v)
    return {
        k: [round(float(np.nanpercentile(v, 2.5)), 4), round(float(np.nanpercentile(v, 97.5)), 4)]
        for k, v in samples.items()
    }
