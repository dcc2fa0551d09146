"""What a worker keeps warm between jobs (``WorkerContext``) and what one run of a study
collects before it writes (``Run``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
from psycopg_pool import ConnectionPool

from orchestrator.deliver.events import EventPublisher
from orchestrator.inference import routing
from orchestrator.inference.client import (
    InferenceClient,
)
from orchestrator.inference.specs import ModelSpec
from orchestrator.settings import WorkerSettings
from orchestrator.store.objects import ObjectStore
from orchestrator.triage import applicability
from preprocess.sandbox import DecodeSandbox


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
class Prepared:
    instance_id: UUID
    # Model → that model's input tensor (each model's own preprocessing).
    tensors: dict[str, np.ndarray]
    warnings: tuple[str, ...]
    preview_key: str
    # The model sets whose rules the image meets.
    sets: tuple[str, ...] = ()


@dataclass
class Run:
    """What one run of a study has learned, written at the end in one transaction."""

    study: dict[str, Any]
    routes: dict[str, list[routing.Route]]
    prepared: list[Prepared] = field(default_factory=list)
    # Instance → reason, for instances that failed (the preview key, where one was stored).
    failed: dict[UUID, str] = field(default_factory=dict)
    failed_previews: dict[UUID, str] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    # Instance → why no model set takes it (the failed rules in words).
    not_applicable: dict[UUID, str] = field(default_factory=dict)


@dataclass
class Clock:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - started) * 1e3
