"""Confidence drift of a model version: live top-class confidences against its reference.

Each model version ships ``model_repository/<model>/<version>/reference.json``: a 20-bin
histogram over [0.5, 1.0] of the validation set's top-class confidence (keys ``bins``,
``counts``, ``quantiles``). The live window is the newest N live results of that version
(results table). Statistics: PSI (population stability index; the usual reading is < 0.1
stable, 0.1–0.25 moderate, > 0.25 significant shift) and the Jensen–Shannon distance
(base 2, in [0, 1]). The math is pure; ``live_confidences`` and ``quality`` query PostgreSQL.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import Connection

from orchestrator.store.db import models as db

REFERENCE_FILE = "reference.json"
# Added to every bin share so empty bins keep PSI and log ratios finite (a common choice;
# small against a 1/20 uniform share).
PSI_EPSILON = 1e-4
# Drift is not reported from fewer live results than this: a handful of images says nothing.
MIN_WINDOW = 20


@dataclass(frozen=True)
class Reference:
    bins: tuple[float, ...]
    counts: tuple[int, ...]
    quantiles: dict[str, float]

    @classmethod
    def load(cls, path: Path) -> Reference:
        raw = json.loads(path.read_text())
        bins = tuple(float(b) for b in raw["bins"])
        counts = tuple(int(c) for c in raw["counts"])
        if len(bins) != len(counts) + 1 or any(
            b >= a for a, b in zip(bins[1:], bins, strict=False)
        ):
            raise ValueError(f"{path}: bins must be increasing edges, one more than counts")
        return cls(bins, counts, {str(k): float(v) for k, v in raw.get("quantiles", {}).items()})


@dataclass(frozen=True)
class Drift:
    model: str
    version: int
    window: int
    psi: float
    js: float
    live_counts: tuple[int, ...]


def reference_path(repository: Path, model: str, version: int) -> Path:
    return repository / model / str(version) / REFERENCE_FILE


def histogram(values: list[float] | np.ndarray, bins: tuple[float, ...]) -> np.ndarray:
    """Counts per reference bin; values outside [first, last] are clipped into the end bins."""
    arr = np.clip(np.asarray(values, dtype=np.float64), bins[0], bins[-1])
    counts, _ = np.histogram(arr, bins=np.asarray(bins))
    return counts


def _shares(counts: np.ndarray | tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(counts, dtype=np.float64)
    total = arr.sum()
    if total <= 0:
        raise ValueError("a histogram with no observations has no distribution")
    shares: np.ndarray = arr / total
    return shares


def psi(reference: np.ndarray | tuple[int, ...], live: np.ndarray | tuple[int, ...]) -> float:
    """Population stability index: sum over bins of (live - ref) * ln(live / ref)."""
    p = _shares(reference) + PSI_EPSILON
    q = _shares(live) + PSI_EPSILON
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(
    reference: np.ndarray | tuple[int, ...], live: np.ndarray | tuple[int, ...]
) -> float:
    """Jensen–Shannon distance (square root of the divergence, base 2): 0 same, 1 disjoint."""
    p = _shares(reference)
    q = _shares(live)
    m = (p + q) / 2

    def _kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return math.sqrt(max(0.0, (_kl(p, m) + _kl(q, m)) / 2))


def compare(model: str, version: int, reference: Reference, live: list[float]) -> Drift | None:
    """Drift of a live window against the reference; None below MIN_WINDOW observations."""
    if len(live) < MIN_WINDOW:
        return None
    counts = histogram(live, reference.bins)
    return Drift(
        model,
        version,
        len(live),
        psi(reference.counts, counts),
        js_distance(reference.counts, counts),
        tuple(int(c) for c in counts),
    )


def live_confidences(conn: Connection[Any], model: str, version: int, window: int) -> list[float]:
    """The newest ``window`` live top-class confidences of one model version."""
    return db.live_confidences(conn, model, version, window)


@dataclass(frozen=True)
class Quality:
    """Per model version over the window: review share and agreement rates (None = no data)."""

    model: str
    version: int
    review_share: float | None
    arm_agreement: float | None
    review_agreement: float | None


def quality(conn: Connection[Any], model: str, version: int, window: int) -> Quality:
    """Share of this version's studies sent to review, agreement with the other arm on the
    same images (shadow vs live) and the share of closed reviews whose verdict was 'agree'."""
    studies, reviewed, verdicts, agreed, arm_agreement = db.quality_counts(
        conn, model, version, window
    )
    return Quality(
        model,
        version,
        reviewed / studies if studies else None,
        float(arm_agreement) if arm_agreement is not None else None,
        agreed / verdicts if verdicts else None,
    )
