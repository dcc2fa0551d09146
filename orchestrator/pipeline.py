"""Processing one study: stored originals → applicability → preprocess → each applicable
model set's models (triage, then analysis, …) → gate → report.

Each image goes only to the model sets whose rules it meets (orchestrator/applicability.py);
an image that meets none is ``not_applicable`` with the failed rules in words, and a study
none of whose images is applicable ends ``not_applicable``. One decode feeds every model the
image goes to, each with its own preprocessing (``model_repository/<model>/preprocess.json``).

``process_study`` takes ids, reads everything else from PostgreSQL and the object store, and
is safe to run twice: results are unique per (instance, model, version), the report revision
is fixed, and state moves only by conditional update.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from uuid import UUID

import numpy as np
from psycopg_pool import ConnectionPool

import preprocess
from orchestrator import (
    applicability,
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
from preprocess.pipeline import Target
from preprocess.sandbox import DecodeSandbox

log = logging.getLogger(__name__)

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
    # The model sets and their applicability rules (model_repository/*/applicability.toml).
    sets: list[applicability.ModelSet] = field(default_factory=list)
    worker_name: str = "worker"
    events: EventPublisher | None = None
    # Decoding in a child process (preprocess/sandbox.py); None = in this process.
    sandbox: DecodeSandbox | None = None


@dataclass
class _Prepared:
    instance_id: UUID
    # Model → that model's input tensor (each model's own preprocessing).
    tensors: dict[str, np.ndarray]
    warnings: tuple[str, ...]
    preview_key: str
    # The model sets whose rules the image meets.
    sets: tuple[str, ...] = ()


@dataclass
class _Run:
    """What one run of a study has learned, written at the end in one transaction."""

    study: dict[str, Any]
    routes: dict[str, list[routing.Route]]
    prepared: list[_Prepared] = field(default_factory=list)
    # Instance → reason, for instances that failed (the preview key, where one was stored).
    failed: dict[UUID, str] = field(default_factory=dict)
    failed_previews: dict[UUID, str] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    # Instance → why no model set takes it (the failed rules in words).
    not_applicable: dict[UUID, str] = field(default_factory=dict)


@dataclass
class _Clock:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - started) * 1e3


def _decode(
    ctx: WorkerContext,
    data: bytes,
    transfer_syntax_uid: str | None,
    targets: list[Target],
) -> preprocess.Preprocessed:
    """Bytes → tensor + preview: in the decode sandbox when the worker has one and a codec
    would decode the pixel data (or ``decode_isolation_uncompressed``), else in-process."""
    s = ctx.settings
    limits = (s.max_pixels, s.preview_max_size, s.preview_quality)
    box = ctx.sandbox
    if box is None:
        return sandbox.decode(data, targets, *limits)
    if not s.decode_isolation_uncompressed and not sandbox.needs_codec(transfer_syntax_uid):
        try:
            return sandbox.decode(data, targets, *limits, native_only=True)
        except sandbox.CodecNeeded:
            pass  # the file says otherwise than its instance row: the sandbox decides
    return box.run(
        data,
        targets,
        max_pixels=s.max_pixels,
        preview_max_size=s.preview_max_size,
        preview_quality=s.preview_quality,
    )


def _target(ctx: WorkerContext, model: str) -> Target:
    spec = ctx.models[model]
    dims = spec.inputs[0].dims
    return (
        preprocess.PreprocessSpec.from_dict(spec.preprocess),
        (int(dims[0]), int(dims[1]), int(dims[2])),
    )


def _applicable_sets(
    ctx: WorkerContext, data: bytes
) -> tuple[list[applicability.Verdict], list[applicability.Verdict]]:
    """(every set's verdict, the applicable ones) from the file's header (no pixel data)."""
    header = preprocess.read_dicom(data, stop_before_pixels=True)
    verdicts = applicability.evaluate(ctx.sets, header)
    return verdicts, [v for v in verdicts if v.applicable]


def _prepare(
    ctx: WorkerContext, study: dict[str, Any], rows: list[dict[str, Any]], run: _Run, clock: _Clock
) -> None:
    """Fetch, check applicability, decode once into every applicable model's tensor, store the
    preview. Fills ``run.prepared``, ``run.failed`` and ``run.not_applicable``."""
    members = {s.name: s.models for s in ctx.sets}
    for row in rows:
        t0 = time.perf_counter()
        try:
            data = verify_sha256(
                retry.call(partial(ctx.store.get, row["object_key"]), what="store.get"),
                row["sha256"],
            )
        except ObjectTampered as exc:
            clock.add("fetch", t0)
            run.failed[row["id"]] = f"integrity: {exc}"
            continue
        clock.add("fetch", t0)
        t0 = time.perf_counter()
        try:
            verdicts, chosen = _applicable_sets(ctx, data)
            if not chosen:
                clock.add("preprocess", t0)
                run.not_applicable[row["id"]] = applicability.not_applicable_reason(verdicts)
                continue
            models = list(dict.fromkeys(m for v in chosen for m in members[v.set]))
            targets = list(dict.fromkeys(_target(ctx, m) for m in models))
            out = _decode(ctx, data, row["transfer_syntax_uid"], targets)
        except preprocess.PreprocessError as exc:
            clock.add("preprocess", t0)
            run.failed[row["id"]] = f"{exc.category}: {exc}"
            continue
        clock.add("preprocess", t0)
        t0 = time.perf_counter()
        key = preview_key(str(study["tenant_id"]), str(study["id"]), str(row["id"]))
        retry.call(
            partial(ctx.store.put, key, out.preview_jpeg, content_type="image/jpeg"),
            what="store.put",
        )
        clock.add("store", t0)
        tensors = {m: out.tensors[targets.index(_target(ctx, m))] for m in models}
        warnings = out.warnings + tuple(w for v in chosen for w in v.warnings)
        run.prepared.append(
            _Prepared(row["id"], tensors, warnings, key, tuple(v.set for v in chosen))
        )


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


def _run_model(
    ctx: WorkerContext,
    model: str,
    run: _Run,
    clock: _Clock,
    prepared: list[_Prepared],
) -> None:
    """Run ``prepared`` (the images of the model's set) through the study's live version (and
    shadows); collect the results in ``run`` (written with the report, in one transaction).

    A live version that Triton no longer serves fails over to the remaining live arms (the
    event is recorded); a failing shadow is logged and skipped, never failing the study.
    Every response is checked first (inference.check_outputs); instances whose live outputs
    are unusable fail with the reason, and no result is kept for them.
    """
    from orchestrator import rollout

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


def _failed_rows(run: _Run) -> list[tuple[UUID, str, str | None, list[str], str | None]]:
    """``db.finish_instances`` rows for the run's failed instances (with their preview, where
    one was stored before the model outputs proved unusable)."""
    return [
        (iid, "failed", run.failed_previews.get(iid), [], reason)
        for iid, reason in run.failed.items()
    ] + [(iid, "not_applicable", None, [], reason) for iid, reason in run.not_applicable.items()]


def _finish(
    ctx: WorkerContext,
    run: _Run,
    token: UUID,
    job_id: str,
    attempt: int,
    clock: _Clock,
) -> StudyStatus | None:
    """Everything a run writes, in one transaction that holds the study row: instance states,
    results, the gate's review case, the next report revision, the final state, the webhook
    notice and the attempt's outcome. None (nothing written) when a newer run has claimed
    the study."""
    study_id = run.study["id"]
    t0 = time.perf_counter()
    with ctx.pool.connection() as conn:
        study = claims.hold(conn, study_id, token)
        if study is None:
            return None
        db.finish_instances(
            conn,
            _failed_rows(run)
            + [
                (p.instance_id, "done", p.preview_key, list(p.warnings), None) for p in run.prepared
            ],
        )
        db.insert_results(conn, run.results)
        # Every stored result of the study (shadows too): the gate's input and the report's.
        stored = db.results(conn, study_id, include_shadow=True)
        error: str | None = None
        if not run.prepared and run.not_applicable and not run.failed:
            # No image meets any model set's rules: no result, nothing to review, never "normal".
            final = StudyStatus.NOT_APPLICABLE
        elif not run.prepared:
            final = StudyStatus.FAILED
            error = (
                "no instance has usable model outputs"
                if run.failed_previews
                else "no instance could be preprocessed"
            )
        else:
            # Reason codes and urgency from the stored results (orchestrator/gate.py).
            decision = gate.evaluate(
                conn,
                run.study,
                stored,
                failed=run.failed,
                warnings={p.instance_id: p.warnings for p in run.prepared},
                prob_outputs={m: spec.probs_output for m, spec in ctx.models.items()},
                default_confidence=ctx.settings.review_confidence_threshold,
                specs=ctx.models,
                triage_models=[s.models[0] for s in ctx.sets],
            )
            final = StudyStatus.NEEDS_REVIEW if decision.reasons else StudyStatus.DONE
            if decision.reasons:
                review.open_case(conn, run.study, decision)
        rows = db.instances(conn, study_id)
        res = [r for r in stored if r["arm"] == "live"]
        case = db.review_case(conn, study_id)
        revision = claims.next_revision(conn, study_id)
        clock.add("report", t0)
        timings = {**study["timings"], **clock.timings}
        study = {**study, "status": final.value, "timings": timings}
        body = report.to_json_bytes(report.build(study, rows, res, case))
        key = report_key(str(study["tenant_id"]), str(study_id), revision, "json")
        retry.call(
            lambda: ctx.store.put(key, body, content_type="application/json"), what="store.put"
        )
        db.insert_report(conn, study_id=study_id, revision=revision, fmt="json", object_key=key)
        claims.release(conn, study_id, token, final, error, timings=clock.timings)
        # Queued in the same transaction: exactly one notice per report, sent off this thread.
        webhooks.emit(
            conn,
            study["tenant_id"],
            webhooks.REPORT_CREATED,
            {
                "study_id": str(study_id),
                "study_instance_uid": study["study_uid"],
                "status": final.value,
                "report_revision": revision,
                "report_url": f"/v1/studies/{study_id}/report",
            },
        )
        db.finish_attempt(conn, job_id=job_id, attempt=attempt, outcome="finished")
    return final


def process_study(ctx: WorkerContext, study_id: UUID, job_id: str) -> str:
    """Run the whole pipeline for one study; return the final status.

    Two transactions per run: the claim (which also reads the instances and the routes),
    and ``_finish``. Decoding and inference in between touch only the object store and
    Triton, so the database sees a run as a claim and a commit, whatever the study's size.
    """
    clock = _Clock()
    started = time.perf_counter()
    with ctx.pool.connection() as conn:
        # A fresh claim per run: only the newest run may write the report and final state.
        claimed = claims.claim(conn, study_id)
        if claimed is None:
            current = db.get_study(conn, study_id, tenant_id=None)
            if current is None:
                log.warning("job %s: study %s no longer exists", job_id, study_id)
                return "missing"
            return str(current["status"])
        study, token = claimed.study, claimed.token
        if claimed.queue_wait_ms is not None:
            clock.timings["queue_wait"] = claimed.queue_wait_ms
        attempt = db.start_attempt(conn, job_id=job_id, worker=ctx.worker_name)
        if attempt > 1:
            metrics.JOB_RETRIES.inc()
        rows = [r for r in db.instances(conn, study_id) if r["status"] != "failed"]
        run = _Run(study=study, routes=routing.load_all_routes(conn))
    events.publish(ctx.events, study, "processing")

    try:
        _prepare(ctx, study, rows, run, clock)
        events.publish(ctx.events, study, "preprocess")
        for model_set in ctx.sets:
            for model in model_set.models:
                members = [p for p in run.prepared if model_set.name in p.sets]
                if members:
                    _run_model(ctx, model, run, clock, members)
                    events.publish(ctx.events, study, model)
        clock.timings["total_worker"] = (time.perf_counter() - started) * 1e3
        final = _finish(ctx, run, token, job_id, attempt, clock)
    except TRANSIENT_ERRORS as exc:
        # Left in 'processing': the job is retried (RQ Retry) or re-enqueued by the reconciler.
        with ctx.pool.connection() as conn:
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error=str(exc)
            )
        raise
    except (InferenceError, Exception) as exc:
        with ctx.pool.connection() as conn:
            if claims.release(
                conn, study_id, token, StudyStatus.FAILED, f"{type(exc).__name__}: {exc}"
            ):
                db.finish_instances(conn, _failed_rows(run))
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error=str(exc)
            )
        metrics.observe_study("failed", clock.timings, 0, len(rows))
        events.publish(ctx.events, study, "failed", "failed")
        raise

    if final is None:  # a newer run of the same job holds the study; it writes the report
        with ctx.pool.connection() as conn:
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error="superseded"
            )
        return "superseded"
    metrics.observe_study(
        final.value,
        clock.timings,
        len(run.prepared),
        len(run.failed),
        len(run.not_applicable),
    )
    events.publish(ctx.events, study, "report", final.value)
    return final.value
