"""Finish a run: everything it writes, in one transaction that holds the study row."""

from __future__ import annotations

import time
from uuid import UUID

from orchestrator import lifecycle
from orchestrator.deliver import webhooks
from orchestrator.lifecycle import StudyStatus
from orchestrator.pipeline.context import Clock, Run, WorkerContext
from orchestrator.queue import retry
from orchestrator.reports import report
from orchestrator.store.db import studies as db
from orchestrator.store.objects import report_key
from orchestrator.triage import gate, review


def failed_rows(run: Run) -> list[tuple[UUID, str, str | None, list[str], str | None]]:
    """``db.finish_instances`` rows for the run's failed instances (with their preview, where
    one was stored before the model outputs proved unusable)."""
    return [
        (iid, "failed", run.failed_previews.get(iid), [], reason)
        for iid, reason in run.failed.items()
    ] + [(iid, "not_applicable", None, [], reason) for iid, reason in run.not_applicable.items()]


def finish(
    ctx: WorkerContext,
    run: Run,
    token: UUID,
    job_id: str,
    attempt: int,
    clock: Clock,
) -> StudyStatus | None:
    """Everything a run writes, in one transaction that holds the study row: instance states,
    results, the gate's review case, the next report revision, the final state, the webhook
    notice and the attempt's outcome. None (nothing written) when a newer run has claimed
    the study."""
    study_id = run.study["id"]
    t0 = time.perf_counter()
    with ctx.pool.connection() as conn:
        study = lifecycle.hold(conn, study_id, token)
        if study is None:
            return None
        db.finish_instances(
            conn,
            failed_rows(run)
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
            # Reason codes and urgency from the stored results (orchestrator/triage/gate.py).
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
        revision = db.next_revision(conn, study_id)
        clock.add("report", t0)
        timings = {**study["timings"], **clock.timings}
        study = {**study, "status": final.value, "timings": timings}
        body = report.to_json_bytes(report.build(study, rows, res, case))
        key = report_key(str(study["tenant_id"]), str(study_id), revision, "json")
        retry.call(
            lambda: ctx.store.put(key, body, content_type="application/json"), what="store.put"
        )
        db.insert_report(conn, study_id=study_id, revision=revision, fmt="json", object_key=key)
        lifecycle.release(conn, study_id, token, final, error, timings=clock.timings)
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
