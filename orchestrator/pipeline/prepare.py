"""Prepare a study's images: fetch and verify each original, check which model sets it meets
(applicability), decode once into every applicable model's tensor, store the preview."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import preprocess
from orchestrator.pipeline.context import Clock, Prepared, Run, WorkerContext
from orchestrator.queue import retry
from orchestrator.store.encryption import ObjectTampered, verify_sha256
from orchestrator.store.objects import preview_key
from orchestrator.triage import applicability
from preprocess import sandbox
from preprocess.pipeline import Target


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


def prepare(
    ctx: WorkerContext, study: dict[str, Any], rows: list[dict[str, Any]], run: Run, clock: Clock
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
            # Each model's input, once; models that share a spec and shape share the tensor.
            wanted = {m: _target(ctx, m) for v in chosen for m in members[v.set]}
            targets = list(dict.fromkeys(wanted.values()))
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
        tensors = {m: out.tensors[targets.index(t)] for m, t in wanted.items()}
        warnings = out.warnings + tuple(w for v in chosen for w in v.warnings)
        run.prepared.append(
            Prepared(row["id"], tensors, warnings, key, tuple(v.set for v in chosen))
        )
