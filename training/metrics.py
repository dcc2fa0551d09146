"""ACC, AUC and expected calibration error, without torch (tests use them on ORT outputs)."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the positive class (rank statistic, ties averaged)."""
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
        "auc": round(auc(probs[:, 1], y), 4),
        "ece": round(ece(probs, y), 4),
    }
