"""Processing one study: stored originals → applicability → preprocess → each applicable
model set's models (triage, then analysis, …) → gate → report.

Each image goes only to the model sets whose rules it meets (orchestrator/triage/applicability.py);
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
from uuid import UUID

from orchestrator import lifecycle, metrics
from orchestrator.deliver import events
from orchestrator.errors import InferenceError
from orchestrator.inference import routing
from orchestrator.lifecycle import StudyStatus
from orchestrator.pipeline.context import Clock, Run, WorkerContext
from orchestrator.pipeline.finish import failed_rows, finish
from orchestrator.pipeline.infer import run_model
from orchestrator.pipeline.prepare import prepare
from orchestrator.queue import retry
from orchestrator.store.db import studies as db

log = logging.getLogger(__name__)

# Errors worth another attempt of the whole job; everything else fails the study at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = retry.TRANSIENT


def process_study(ctx: WorkerContext, study_id: UUID, job_id: str) -> str:
    """Run the whole pipeline for one study; return the final status.

    Two transactions per run: the claim (which also reads the instances and the routes),
    and ``_finish``. Decoding and inference in between touch only the object store and
    Triton, so the database sees a run as a claim and a commit, whatever the study's size.
    """
    clock = Clock()
    started = time.perf_counter()
    with ctx.pool.connection() as conn:
        # A fresh claim per run: only the newest run may write the report and final state.
        claimed = lifecycle.claim(conn, study_id)
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
        run = Run(study=study, routes=routing.load_all_routes(conn))
    events.publish(ctx.events, study, "processing")

    try:
        prepare(ctx, study, rows, run, clock)
        events.publish(ctx.events, study, "preprocess")
        for model_set in ctx.sets:
            for model in model_set.models:
                members = [p for p in run.prepared if model_set.name in p.sets]
                if members:
                    run_model(ctx, model, run, clock, members)
                    events.publish(ctx.events, study, model)
        clock.timings["total_worker"] = (time.perf_counter() - started) * 1e3
        final = finish(ctx, run, token, job_id, attempt, clock)
    except TRANSIENT_ERRORS as exc:
        # Left in 'processing': the job is retried (RQ Retry) or re-enqueued by the reconciler.
        with ctx.pool.connection() as conn:
            db.finish_attempt(
                conn, job_id=job_id, attempt=attempt, outcome="failed", error=str(exc)
            )
        raise
    except (InferenceError, Exception) as exc:
        with ctx.pool.connection() as conn:
            if lifecycle.release(
                conn, study_id, token, StudyStatus.FAILED, f"{type(exc).__name__}: {exc}"
            ):
                db.finish_instances(conn, failed_rows(run))
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
