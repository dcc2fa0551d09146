"""Confidence gate: which studies a clinician must review, why, and how urgently.

Thresholds are per model and version (table ``gate_thresholds``; version 0 = the model's
default), falling back to the worker's settings. The gate reads the study's stored results
(live and shadow arms) and the instances' preprocessing warnings and returns reason codes:

- ``low_confidence``      live top-class confidence below ``min_confidence``
- ``high_entropy``        entropy (nats) of the live class probabilities above ``max_entropy``
- ``shadow_disagreement`` a shadow version's label differs from the live label on an instance
- ``lossy_source`` / ``unusual_photometric`` / ``frames_dropped``  preprocessing warnings
- ``instance_failed``     an instance of the study could not be processed
- ``critical_finding``    a non-normal finding's probability at or above ``critical_probability``
- ``positive_finding``    a positive finding at the model's operating point (findings.py): never
                          finalised without review unless ``operating_point.json`` says
                          ``auto_finalise_positive``
- ``out_of_distribution`` the model's OOD score above the threshold derived for its version
                          (``<version>/gate.json``): the image is unlike what it learned from,
                          so its confidence means nothing
- ``applicability_uncertain`` a tag the set's rules need was absent and accepted with a warning
                          (``body_part_unknown``, ``view_position_unknown``, ``age_unknown``)

Urgency orders the review queue (higher first, then oldest first): a critical finding adds
``URGENCY_CRITICAL``, a STAT study adds ``URGENCY_STAT``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
from psycopg import Connection

from orchestrator.errors import BadRequest
from orchestrator.inference.specs import ModelSpec
from orchestrator.store.db import models as db
from orchestrator.triage import findings

LOW_CONFIDENCE = "low_confidence"
HIGH_ENTROPY = "high_entropy"
SHADOW_DISAGREEMENT = "shadow_disagreement"
LOSSY_SOURCE = "lossy_source"
UNUSUAL_PHOTOMETRIC = "unusual_photometric"
FRAMES_DROPPED = "frames_dropped"
INSTANCE_FAILED = "instance_failed"
CRITICAL_FINDING = "critical_finding"
POSITIVE_FINDING = "positive_finding"
OUT_OF_DISTRIBUTION = "out_of_distribution"
APPLICABILITY_UNCERTAIN = "applicability_uncertain"
REASONS = (
    CRITICAL_FINDING,
    OUT_OF_DISTRIBUTION,
    POSITIVE_FINDING,
    LOW_CONFIDENCE,
    HIGH_ENTROPY,
    SHADOW_DISAGREEMENT,
    LOSSY_SOURCE,
    UNUSUAL_PHOTOMETRIC,
    FRAMES_DROPPED,
    INSTANCE_FAILED,
    APPLICABILITY_UNCERTAIN,
)
# Preprocessing warning prefixes (preprocess/pipeline.py) that send a study to review.
_WARNING_REASONS = {
    "lossy_source": LOSSY_SOURCE,
    "unusual_photometric": UNUSUAL_PHOTOMETRIC,
    "frames_dropped": FRAMES_DROPPED,
    "body_part_unknown": APPLICABILITY_UNCERTAIN,
    "view_position_unknown": APPLICABILITY_UNCERTAIN,
    "age_unknown": APPLICABILITY_UNCERTAIN,
}
# Urgency steps: critical findings outrank STAT, which outranks routine.
URGENCY_CRITICAL = 2
URGENCY_STAT = 1
# Defaults when no gate_thresholds row matches. Entropy of a two-class 0.8/0.2 split is 0.50
# nats, of 0.7/0.3 0.61; above 0.6 the model is close to a coin toss.
DEFAULT_MAX_ENTROPY = 0.6
# A non-normal finding this probable is treated as critical (urgent review).
DEFAULT_CRITICAL_PROBABILITY = 0.9
# Labels that are never findings.
NORMAL_LABELS = findings.NORMAL_LABELS


@dataclass(frozen=True)
class Thresholds:
    min_confidence: float
    max_entropy: float = DEFAULT_MAX_ENTROPY
    critical_probability: float = DEFAULT_CRITICAL_PROBABILITY

    def check(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise BadRequest(f"min_confidence must be in [0, 1], not {self.min_confidence}")
        if self.max_entropy < 0.0:
            raise BadRequest(f"max_entropy must be >= 0 nats, not {self.max_entropy}")
        if not 0.0 <= self.critical_probability <= 1.0:
            raise BadRequest(
                f"critical_probability must be in [0, 1], not {self.critical_probability}"
            )


@dataclass
class Decision:
    reasons: list[str] = field(default_factory=list)
    urgency: int = 0
    # Per reason: what tripped it (model, version, arm, instance, value); no patient data.
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, reason: str, **detail: Any) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.details.setdefault(reason, []).append(detail)


_Stored = dict[tuple[str, int], Thresholds]


def _stored(conn: Connection, models: list[str]) -> _Stored:
    """Every threshold row of ``models``, by (model, version)."""
    return {
        (str(m), int(v)): Thresholds(float(c), float(e), float(p))
        for m, v, c, e, p in db.threshold_rows(conn, models)
    }


def _resolve(stored: _Stored, model: str, version: int, default_confidence: float) -> Thresholds:
    own = stored.get((model, version)) or stored.get((model, 0))
    return own or Thresholds(min_confidence=default_confidence)


def thresholds(conn: Connection, model: str, version: int, default_confidence: float) -> Thresholds:
    """The thresholds for ``model`` ``version``: its own row, else the model's, else defaults."""
    return _resolve(_stored(conn, [model]), model, version, default_confidence)


def effective_thresholds(
    conn: Connection, spec: ModelSpec, default_confidence: float
) -> list[dict[str, Any]]:
    """Per version of ``spec``: every value the gate applies and where each came from (a
    ``gate_thresholds`` row, the worker's default, operating_point.json, gate.json)."""
    stored = _stored(conn, [spec.name])
    rows = []
    for version in spec.versions:
        if (spec.name, version) in stored:
            source = f"gate_thresholds (version {version})"
        elif (spec.name, 0) in stored:
            source = "gate_thresholds (model default)"
        else:
            source = "settings (REVIEW_CONFIDENCE_THRESHOLD) and gate.py defaults"
        t = _resolve(stored, spec.name, version, default_confidence)
        derived = spec.gates.get(version, {})
        op = derived.get("operating_point") or {}
        ood = derived.get("ood") or {}
        rows.append(
            {
                "version": version,
                "min_confidence": t.min_confidence,
                "max_entropy": t.max_entropy,
                "critical_probability": t.critical_probability,
                "confidence_source": source,
                "positive_labels": ",".join(findings.positive_labels(spec)),
                "target_sensitivity": spec.operating_point.get("target_sensitivity"),
                "operating_threshold": findings.operating_threshold(spec, version),
                "operating_source": (
                    f"{version}/gate.json ({op.get('derived_on', 'derivation not stated')})"
                    if op
                    else "none: top-class decision, positives always reviewed"
                ),
                "auto_finalise_positive": bool(
                    spec.operating_point.get("auto_finalise_positive", False)
                ),
                "ood_threshold": ood.get("threshold"),
                "ood_source": (
                    f"{version}/gate.json (validation false-flag rate "
                    f"{ood.get('val_false_flag_rate')})"
                    if ood
                    else ("missing: every result reviewed" if spec.ood_output else "no OOD output")
                ),
            }
        )
    return rows


def list_thresholds(conn: Connection, model: str) -> list[dict[str, Any]]:
    """The model's stored rows (version 0 = every version without its own row)."""
    return db.list_thresholds(conn, model)


def set_thresholds(
    conn: Connection, model: str, version: int, t: Thresholds, *, actor: str | None = None
) -> None:
    t.check()
    if version < 0:
        raise BadRequest(f"version must be >= 0 (0 = the model's default), not {version}")
    db.set_thresholds(
        conn,
        model,
        version,
        min_confidence=t.min_confidence,
        max_entropy=t.max_entropy,
        critical_probability=t.critical_probability,
        actor=actor,
    )


def _probabilities(outputs: dict[str, Any], output_name: str | None) -> np.ndarray | None:
    value = outputs.get(output_name) if output_name else None
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).ravel()
    return arr if arr.size else None


def _operating_point_and_ood(
    decision: Decision, spec: ModelSpec, version: int, r: dict[str, Any], where: dict[str, Any]
) -> None:
    outputs = r["outputs"] or {}
    probs = _probabilities(outputs, spec.probs_output)
    if probs is not None and len(probs) == len(spec.labels):
        auto = bool(spec.operating_point.get("auto_finalise_positive", False))
        if not auto and findings.is_positive(spec, version, probs):
            decision.add(
                POSITIVE_FINDING,
                **where,
                value=round(findings.positive_score(spec, probs), 4),
                threshold=findings.operating_threshold(spec, version),
            )
    name = spec.ood_output
    if name is None:
        return
    ood = spec.gates.get(version, {}).get("ood") or {}
    limit = ood.get("threshold")
    score = _probabilities(outputs, name)
    if score is None or not isinstance(limit, int | float):
        # A model that declares an OOD output but whose version has no threshold (or whose
        # response lacks the score) cannot vouch for its input: review.
        decision.add(OUT_OF_DISTRIBUTION, **where, value=None, threshold=limit)
    elif float(score[0]) > float(limit):
        decision.add(
            OUT_OF_DISTRIBUTION, **where, value=round(float(score[0]), 4), threshold=float(limit)
        )


def evaluate(
    conn: Connection,
    study: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    failed: dict[UUID, str],
    warnings: dict[UUID, tuple[str, ...]],
    prob_outputs: dict[str, str],
    default_confidence: float,
    triage_model: str = "triage",
    specs: Mapping[str, ModelSpec] | None = None,
    triage_models: Collection[str] = (),
) -> Decision:
    """Decide review for a processed study from its stored ``results`` (every arm, as
    ``db.studies.results(include_shadow=True)`` reads them).

    ``prob_outputs`` names each model's class-probability output tensor (from config.pbtxt).
    Low confidence and entropy are judged on the triage model's live arm (every set's first
    model in ``triage_models``); critical findings on any model's live findings; shadow
    disagreement on every model; with ``specs`` (each model's config, operating point and
    per-version gate.json), positive findings at the operating point and OOD scores on every
    live result.
    """
    entry_models = set(triage_models) or {triage_model}
    decision = Decision()
    rows = sorted(results, key=lambda r: (r["model"], r["arm"], r["version"]))
    # Every threshold row of the models at hand in one query, resolved as ``thresholds`` does.
    stored = _stored(conn, sorted({r["model"] for r in rows}))

    def limits(model: str, version: int) -> Thresholds:
        return _resolve(stored, model, version, default_confidence)

    live = {(r["model"], r["instance_id"]): r for r in rows if r["arm"] == "live"}
    for r in rows:
        model, version, inst = r["model"], int(r["version"]), str(r["instance_id"])
        where = {"model": model, "version": version, "arm": r["arm"], "instance": inst}
        if r["arm"] == "shadow":
            ref = live.get((model, r["instance_id"]))
            if ref is not None and ref["label"] != r["label"]:
                decision.add(
                    SHADOW_DISAGREEMENT,
                    **where,
                    live_version=int(ref["version"]),
                    live_label=ref["label"],
                    shadow_label=r["label"],
                )
            continue
        t = limits(model, version)
        spec = (specs or {}).get(model)
        if spec is not None:
            _operating_point_and_ood(decision, spec, version, r, where)
        if model in entry_models:
            confidence = float(r["confidence"])
            if confidence < t.min_confidence:
                decision.add(LOW_CONFIDENCE, **where, value=round(confidence, 4))
            probs = _probabilities(r["outputs"], prob_outputs.get(model))
            if probs is not None:
                h = findings.entropy(probs)
                if h > t.max_entropy:
                    decision.add(HIGH_ENTROPY, **where, value=round(h, 4))
        for f in r["findings"] or []:
            p = float(f.get("probability", 0.0))
            if f.get("code") not in NORMAL_LABELS and p >= t.critical_probability:
                decision.add(CRITICAL_FINDING, **where, code=f.get("code"), value=round(p, 4))
    for inst_id, inst_warnings in warnings.items():
        for w in inst_warnings:
            reason = _WARNING_REASONS.get(w.split(":", 1)[0])
            if reason:
                decision.add(reason, instance=str(inst_id), warning=w)
    for inst_id in failed:
        decision.add(INSTANCE_FAILED, instance=str(inst_id))
    decision.reasons.sort(key=REASONS.index)
    if CRITICAL_FINDING in decision.reasons:
        decision.urgency += URGENCY_CRITICAL
    if study.get("priority") == "stat":
        decision.urgency += URGENCY_STAT
    return decision
