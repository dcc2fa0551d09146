"""Processing one study: stored originals → preprocess → triage → analysis → gate → report.

``process_study`` takes ids, reads everything else from PostgreSQL and the object store, and
is safe to run twice: results are unique per (instance, model, version), the report revision
is fixed, and state moves only by conditional update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from uuid import UUID

import numpy as np
from psycopg_pool import ConnectionPool

import preprocess
from orchestrator import (
    events,
    findings,
    gate,
    metrics,
    report,
    retry,
    review,
    routing,
    webhooks,
)
from orchestrator.db import claims
from orchestrator.db import studies as db
from orchestrator.db.studies import StudyStatus
from orchestrator.errors import InferenceError, InvalidOutput, ModelUnavailable
from orchestrator.events import EventPublisher
from orchestrator.inference import (
    PRIORITY_DEFAULT,
    PRIORITY_STAT,
    InferenceClient,
    batches,
    check_outputs,
)
from orchestrator.security.crypto import ObjectTampered, verify_sha256
from orchestrator.settings import WorkerSettings
from orchestrator.storage import ObjectStore, preview_key, report_key
from orchestrator.triton.config import ModelSpec
from preprocess import sandbox
from preprocess.sandbox import DecodeSandbox

log = logging.getLogger(__name__)

TRIAGE_MODEL = "triage"
ANALYSIS_MODEL = "analysis"
# Errors worth another attempt of the whole job; everything else fails the study at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = retry.TRANSIENT


@dataclass
class WorkerContext:
    """What a worker process keeps warm between jobs."""

    settings: WorkerSettings
    pool: ConnectionPool
    store: ObjectStore
    inference: InferenceClient
    models: dict[str, ModelSpec]
    worker_name: str = "worker"
    events: EventPublisher | None = None
    # Decoding in a child process (preprocess/sandbox.py); None = in this process.
    sandbox: DecodeSandbox | None = None


@dataclass
class _Prepared:
    instance_id: UUID
    tensor: np.ndarray
    warnings: tuple[str, ...]


@dataclass
class _Clock:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - started) * 1e3


def _decode(
    ctx: WorkerContext, data: bytes, spec: preprocess.PreprocessSpec, shape: tuple[int, int, int]
) -> preprocess.Preprocessed:
    """Bytes → tensor + preview, in the decode sandbox when the worker has one."""
    limits = {
        "max_pixels": ctx.settings.max_pixels,
        "preview_max_size": ctx.settings.preview_max_size,
        "preview_quality": ctx.settings.preview_quality,
    }
    if ctx.sandbox is not None:
        return ctx.sandbox.run(data, spec, shape, **limits)
    return sandbox.decode(data, spec, shape, **limits)


def _prepare(
    ctx: WorkerContext, study: dict[str, Any], rows: list[dict[str, Any]], clock: _Clock
) -> tuple[list[_Prepared], dict[UUID, str]]:
    spec = ctx.models[TRIAGE_MODEL]
    pp_spec = preprocess.PreprocessSpec.from_dict(spec.preprocess)
    shape = spec.inputs[0].dims
    prepared: list[_Prepared] = []
    failed: dict[UUID, str] = {}
    for row in rows:
        t0 = time.perf_counter()
        try:
            data = verify_sha256(
                retry.call(partial(ctx.store.get, row["object_key"]), what="store.get"),
                row["sha256"],
            )
        except ObjectTampered as exc:
            clock.add("fetch", t0)
            failed[row["id"]] = f"integrity: {exc}"
            continue
        clock.add("fetch", t0)
        t0 = time.perf_counter()
        try:
            out = _decode(ctx, data, pp_spec, (int(shape[0]), int(shape[1]), int(shape[2])))
        except preprocess.PreprocessError as exc:
            clock.add("preprocess", t0)
            failed[row["id"]] = f"{exc.category}: {exc}"
            continue
        clock.add("preprocess", t0)
        t0 = time.perf_counter()
        key = preview_key(str(study["tenant_id"]), str(study["id"]), str(row["id"]))
        retry.call(
            partial(ctx.store.put, key, out.preview_jpeg, content_type="image/jpeg"),
            what="store.put",
        )
        clock.add("store", t0)
        with ctx.pool.connection() as conn:
            db.finish_instance(
                conn, row["id"], status="stored", preview_key=key, warnings=list(out.warnings)
            )
        prepared.append(_Prepared(row["id"], out.tensor, out.warnings))
    return prepared, failed


def _infer_chunks(
    ctx: WorkerContext,
    spec: ModelSpec,
    version: int,
    prepared: list[_Prepared],
    priority: int,
) -> list[tuple[list[_Prepared], dict[str, np.ndarray], float]]:
    size = max(1, min(ctx.settings.infer_batch_size, spec.max_batch_size or 1))
    out = []
    for part in batches(len(prepared), size):
        chunk = prepared[part]
        batch = np.stack([p.tensor for p in chunk]).astype(np.float32, copy=False)
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


def _live_version(ctx: WorkerContext, model: str, study: dict[str, Any]) -> routing.Choice:
    with ctx.pool.connection() as conn:
        return routing.choose(model, study["study_uid"], routing.load_routes(conn, model))


def _run_model(
    ctx: WorkerContext,
    model: str,
    study: dict[str, Any],
    prepared: list[_Prepared],
    clock: _Clock,
    describe: Callable[[ModelSpec, dict[str, np.ndarray], int], tuple[str, float, list[Any]]],
) -> dict[UUID, str]:
    """Run every prepared image through the study's live version (and shadows); store results.

    A live version that Triton no longer serves fails over to the remaining live arms (the
    event is recorded); a failing shadow is logged and skipped, never failing the study.
    Every response is checked first (inference.check_outputs); returns the instances whose
    live outputs are unusable, with the reason. Nothing is stored for them.
    """
    from orchestrator import rollout

    spec = ctx.models[model]
    priority = PRIORITY_STAT if study["priority"] == "stat" else PRIORITY_DEFAULT
    choice = _live_version(ctx, model, study)
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
            log.warning("%s v%s unavailable; failed over", model, choice.live)
            choice = _live_version(ctx, model, study)
    runs = [("live", choice.live, live_runs)]
    for version in choice.shadows:
        try:
            runs.append(("shadow", version, _infer_chunks(ctx, spec, version, prepared, priority)))
        except InferenceError as exc:
            metrics.inference_error(model, version, "shadow", exc)
            log.warning("shadow %s v%s failed: %s", model, version, type(exc).__name__)
    invalid: dict[UUID, str] = {}
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
            with ctx.pool.connection() as conn:
                for i, item in enumerate(chunk):
                    problem = check.problem(i)
                    if problem is not None:
                        if arm == "live":
                            reason = f"invalid_output: {model} v{version}: {problem}"
                            invalid[item.instance_id] = reason
                        continue
                    label, confidence, found = describe(spec, outputs, i)
                    metrics.observe_prediction(model, version, arm, label, confidence)
                    db.insert_result(
                        conn,
                        study_id=study["id"],
                        instance_id=item.instance_id,
                        model=model,
                        version=version,
                        arm=arm,
                        label=label,
                        confidence=confidence,
                        outputs={k: v[i].tolist() for k, v in outputs.items()},
                        findings=found,
                        latency_ms=elapsed_ms / len(chunk),
                    )
    return invalid


def _drop_invalid(
    ctx: WorkerContext,
    prepared: list[_Prepared],
    failed: dict[UUID, str],
    invalid: dict[UUID, str],
) -> list[_Prepared]:
    """Fail the instances whose model outputs are unusable; the rest go on."""
    if invalid:
        with ctx.pool.connection() as conn:
            for instance_id, reason in invalid.items():
                db.finish_instance(conn, instance_id, status="failed", error=reason)
        failed.update(invalid)
    return [p for p in prepared if p.instance_id not in invalid]


def _describe_triage(
    spec: ModelSpec, outputs: dict[str, np.ndarray], i: int
) -> tuple[str, float, list[Any]]:
    label, confidence = findings.top_class(outputs[spec.outputs[0].name][i], spec.labels)
    return label, confidence, []


def _describe_analysis(
    spec: ModelSpec, outputs: dict[str, np.ndarray], i: int
) -> tuple[str, float, list[Any]]:
    probs = outputs[spec.outputs[0].name][i]
    heat = outputs[spec.outputs[1].name][i] if len(spec.outputs) > 1 else None
    label, confidence = findings.top_class(probs, spec.labels)
    return label, confidence, findings.analysis_findings(probs, heat, spec.labels)


def _gate(
    ctx: WorkerContext,
    study: dict[str, Any],
    failed: dict[UUID, str],
    prepared: list[_Prepared],
) -> gate.Decision:
    """Reason codes and urgency from the stored results (orchestrator/gate.py)."""
    with ctx.pool.connection() as conn:
        return gate.evaluate(
            conn,
            study,
            failed=failed,
            warnings={p.instance_id: p.warnings for p in prepared},
            prob_outputs={m: spec.outputs[0].name for m, spec in ctx.models.items()},
            default_confidence=ctx.settings.review_confidence_threshold,
            triage_model=TRIAGE_MODEL,
        )


def _write_report(
    ctx: WorkerContext,
    study_id: UUID,
    token: UUID,
    status: StudyStatus,
    error: str | None,
    clock: _Clock,
) -> bool:
    """Store the next report revision and set ``status``, in one transaction that holds the
    study row; False (nothing written) when a newer run has claimed the study."""
    t0 = time.perf_counter()
    with ctx.pool.connection() as conn:
        if not claims.hold(conn, study_id, token):
            return False
        study = db.get_study(conn, study_id, tenant_id=None)
        assert study is not None
        rows = db.instances(conn, study_id)
        res = db.results(conn, study_id)
        review = db.review_case(conn, study_id)
        revision = claims.next_revision(conn, study_id)
        clock.add("report", t0)
        timings = {**study["timings"], **clock.timings}
        study = {**study, "status": status.value, "timings": timings}
        body = report.to_json_bytes(report.build(study, rows, res, review))
        key = report_key(str(study["tenant_id"]), str(study_id), revision, "json")
        retry.call(
            lambda: ctx.store.put(key, body, content_type="application/json"), what="store.put"
        )
        db.insert_report(conn, study_id=study_id, revision=revision, fmt="json", object_key=key)
        db.merge_timings(conn, study_id, clock.timings)
        claims.release(conn, study_id, token, status, error)
        # Queued in the same transaction: exactly one notice per report, sent off this thread.
        webhooks.emit(
            conn,
            study["tenant_id"],
            webhooks.REPORT_CREATED,
            {
                "study_id": str(study_id),
                "study_instance_uid": study["study_uid"],
                "status": status.value,
                "report_revision": revision,
                "report_url": f"/v1/studies/{study_id}/report",
            },
        )
    return True


def process_study(ctx: WorkerContext, study_id: UUID, job_id: str) -> str:
    """Run the whole pipeline for one study; return the final status."""
    clock = _Clock()
    started = time.perf_counter()
    with ctx.pool.connection() as conn:
        study = db.get_study(conn, study_id, tenant_id=None)
        if study is None:
            log.warning("job %s: study %s no longer exists", job_id, study_id)
            return "missing"
        # A fresh claim per run: only the newest run may write the report and final state.
        token = claims.claim(conn, study_id)
        if token is None:
            return str(study["status"])
        if study["queued_at"] is not None:
            row = conn.execute(
                "SELECT extract(epoch FROM (started_at - queued_at)) * 1000 FROM studies"
                " WHERE id = %s",
                (study_id,),
            ).fetchone()
            clock.timings["queue_wait"] = float(row[0]) if row and row[0] is not None else 0.0
        attempt = db.start_attempt(conn, job_id=job_id, worker=ctx.worker_name)
        if attempt > 1:
            metrics.JOB_RETRIES.inc()
        rows = [r for r in db.instances(conn, study_id) if r["status"] != "failed"]
        events.publish(ctx.events, study, "processing")

    try:
        prepared, failed = _prepare(ctx, study, rows, clock)
        events.publish(ctx.events, study, "preprocess")
        with ctx.pool.connection() as conn:
            for instance_id, reason in failed.items():
                db.finish_instance(conn, instance_id, status="failed", error=reason)
        preprocessed = bool(prepared)
        if prepared:
            invalid = _run_model(ctx, TRIAGE_MODEL, study, prepared, clock, _describe_triage)
            prepared = _drop_invalid(ctx, prepared, failed, invalid)
            events.publish(ctx.events, study, "triage")
        if prepared:
            invalid = _run_model(ctx, ANALYSIS_MODEL, study, prepared, clock, _describe_analysis)
            prepared = _drop_invalid(ctx, prepared, failed, invalid)
            events.publish(ctx.events, study, "analysis")
        with ctx.pool.connection() as conn:
            for p in prepared:
                db.finish_instance(conn, p.instance_id, status="done", warnings=list(p.warnings))
        error: str | None
        if not prepared:
            final = StudyStatus.FAILED
            error = (
                "no instance has usable model outputs"
                if preprocessed
                else "no instance could be preprocessed"
            )
        else:
            decision = _gate(ctx, study, failed, prepared)
            reasons = decision.reasons
            final, error = (StudyStatus.NEEDS_REVIEW, None) if reasons else (StudyStatus.DONE, None)
            if reasons:
                with ctx.pool.connection() as conn:
                    review.open_case(conn, study, decision)
        clock.timings["total_worker"] = (time.perf_counter() - started) * 1e3
        finished = _write_report(ctx, study_id, token, final, error, clock)
    except TRANSIENT_ERRORS as exc:
        # Left in 'processing': the job is retried (RQ Retry) or re-enqueued by the reconciler.
        with ctx.pool.connection() as conn:
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error=str(exc)
            )
        raise
    except (InferenceError, Exception) as exc:
        with ctx.pool.connection() as conn:
            claims.release(
                conn, study_id, token, StudyStatus.FAILED, f"{type(exc).__name__}: {exc}"
            )
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error=str(exc)
            )
        metrics.observe_study("failed", clock.timings, 0, len(rows))
        events.publish(ctx.events, study, "failed", "failed")
        raise

    with ctx.pool.connection() as conn:
        if not finished:  # a newer run of the same job holds the study; it writes the report
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error="superseded"
            )
            return "superseded"
        db.finish_attempt(conn, job_id=job_id, attempt=attempt, outcome="finished")
    metrics.observe_study(final.value, clock.timings, len(prepared), len(failed))
    events.publish(ctx.events, study, "report", final.value)
    return final.value
