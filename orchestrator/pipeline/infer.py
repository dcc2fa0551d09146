"""Run the prepared images through each model: routing (live, shadows, failover), batched
Triton calls, output checks, and the result rows (written later, by ``finish``)."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any
from uuid import UUID

import numpy as np

from orchestrator import metrics
from orchestrator.errors import InferenceError, InvalidOutput, ModelUnavailable
from orchestrator.inference import routing
from orchestrator.inference.client import (
    PRIORITY_DEFAULT,
    PRIORITY_STAT,
    batches,
    check_outputs,
)
from orchestrator.inference.specs import ModelSpec
from orchestrator.pipeline.context import Clock, Prepared, Run, WorkerContext
from orchestrator.queue import retry
from orchestrator.triage import findings

log = logging.getLogger(__name__)


def _infer_chunks(
    ctx: WorkerContext,
    spec: ModelSpec,
    version: int,
    prepared: list[Prepared],
    priority: int,
) -> list[tuple[list[Prepared], dict[str, np.ndarray], float]]:
    size = max(1, min(ctx.settings.infer_batch_size, spec.max_batch_size or 1))
    out = []
    for part in batches(len(prepared), size):
        chunk = prepared[part]
        batch = np.stack([p.tensors[spec.name] for p in chunk]).astype(np.float32, copy=False)
        t0 = time.perf_counter()
        outputs = retry.call(
            partial(
                ctx.inference.infer,
                spec,
                version,
                {spec.inputs[0].name: batch},
                priority=priority,
                timeout_s=ctx.settings.triton_timeout_s,
            ),
            what=f"infer {spec.name}",
        )
        out.append((chunk, outputs, (time.perf_counter() - t0) * 1e3))
    return out


def run_model(
    ctx: WorkerContext,
    model: str,
    run: Run,
    clock: Clock,
    prepared: list[Prepared],
) -> None:
    """Run ``prepared`` (the images of the model's set) through the study's live version (and
    shadows); collect the results in ``run`` (written with the report, in one transaction).

    A live version that Triton no longer serves fails over to the remaining live arms (the
    event is recorded); a failing shadow is logged and skipped, never failing the study.
    Every response is checked first (inference.check_outputs); instances whose live outputs
    are unusable fail with the reason, and no result is kept for them.
    """
    from orchestrator.inference import rollout

    spec = ctx.models[model]
    study = run.study
    priority = PRIORITY_STAT if study["priority"] == "stat" else PRIORITY_DEFAULT
    choice = routing.choose(model, study["study_uid"], run.routes.get(model, []))
    while True:
        try:
            live_runs = _infer_chunks(ctx, spec, choice.live, prepared, priority)
            break
        except ModelUnavailable as exc:
            metrics.inference_error(model, choice.live, "live", exc)
            if not ctx.inference.is_ready():
                raise  # Triton itself is down: retry the job later, never fail over
            with ctx.pool.connection() as conn:
                routes = routing.load_routes(conn, model)
                others = [r for r in routes if not r.shadow and r.version != choice.live]
                if not others:
                    raise
                rollout.failover(
                    conn, model, choice.live, actor=f"worker:{ctx.worker_name}", reason=str(exc)
                )
                run.routes[model] = routing.load_routes(conn, model)
            log.warning("%s v%s unavailable; failed over", model, choice.live)
            choice = routing.choose(model, study["study_uid"], run.routes[model])
    runs = [("live", choice.live, live_runs)]
    for version in choice.shadows:
        try:
            runs.append(("shadow", version, _infer_chunks(ctx, spec, version, prepared, priority)))
        except InferenceError as exc:
            metrics.inference_error(model, version, "shadow", exc)
            log.warning("shadow %s v%s failed: %s", model, version, type(exc).__name__)
    invalid: dict[UUID, str] = {}
    kept: list[dict[str, Any]] = []
    for arm, version, chunks in runs:
        for chunk, outputs, elapsed_ms in chunks:
            metrics.observe_inference(model, version, arm, elapsed_ms / 1e3, len(chunk))
            if arm == "live":
                clock.timings[model] = clock.timings.get(model, 0.0) + elapsed_ms
            check = check_outputs(spec, len(chunk), outputs)
            if check.batch_problem or check.row_problems:
                first = check.batch_problem or next(iter(check.row_problems.values()))
                metrics.inference_error(model, version, arm, InvalidOutput(model, version, first))
                log.warning("%s v%s (%s) returned unusable outputs: %s", model, version, arm, first)
            for i, item in enumerate(chunk):
                problem = check.problem(i)
                if problem is not None:
                    if arm == "live":
                        invalid[item.instance_id] = f"invalid_output: {model} v{version}: {problem}"
                    continue
                label, confidence, found = findings.describe(spec, version, outputs, i)
                metrics.observe_prediction(model, version, arm, label, confidence)
                kept.append(
                    {
                        "study_id": study["id"],
                        "instance_id": item.instance_id,
                        "model": model,
                        "version": version,
                        "arm": arm,
                        "label": label,
                        "confidence": confidence,
                        "outputs": {k: v[i].tolist() for k, v in outputs.items()},
                        "findings": found,
                        "latency_ms": elapsed_ms / len(chunk),
                    }
                )
    # Fail the instances whose live outputs are unusable; the rest go on.
    run.results += [r for r in kept if r["instance_id"] not in invalid]
    for p in prepared:
        if p.instance_id in invalid:
            run.failed[p.instance_id] = invalid[p.instance_id]
            run.failed_previews[p.instance_id] = p.preview_key
    run.prepared = [p for p in run.prepared if p.instance_id not in invalid]
