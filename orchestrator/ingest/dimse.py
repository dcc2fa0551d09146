"""DIMSE C-STORE receiver (``medtriage dimse``): a Storage SCP with pynetdicom.

Accepts every storage SOP class, private and unknown ones included (as REST and STOW-RS
do), in every transfer syntax pynetdicom knows, and C-ECHO. Each received instance goes
through the same ingest as the API (one tenant per receiver, ``dimse_tenant``); the
C-STORE status says what happened:

    0x0000  stored; or already stored, with the ErrorComment "already stored (duplicate)"
            (the same SOPInstanceUID with the same content is not stored twice)
    0x0111  a SOPInstanceUID already stored with other content (conflict): not stored
    0xA700  refused, out of resources: queue overloaded or a dependency down; retry later
    0xA900  not an image this platform can triage (no pixel data, non-image SOP class, ...),
            a coded value it does not allow, or another patient's instance in a study
    0xC000  cannot understand (unreadable, missing or invalid UIDs)

with an ErrorComment naming the reason. Studies are queued by the arrivals sweeper
(orchestrator/ingest/arrivals.py) once no instance has arrived for the stable age, or at once when
the sender releases the association (``dimse_release_completes``; an abort never completes).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from redis import Redis

from orchestrator import metrics
from orchestrator.errors import MedtriageError
from orchestrator.ingest import core as ingest
from orchestrator.ingest import stow as dicomweb
from orchestrator.queue import backpressure
from orchestrator.store.db import translate_errors
from orchestrator.store.db.audit import record_upload
from orchestrator.store.db.keys import Principal, ensure_tenant
from orchestrator.store.objects import ObjectStore

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Said with the success status of an instance stored before (the same content again).
DUPLICATE_COMMENT = "already stored (duplicate): kept once"
# ErrorComment (0000,0902) is LO: at most 64 characters.
_COMMENT_MAX = 64
# How long a stopped server waits for open associations to finish.
ASSOCIATION_TIMEOUT_S = 30.0


@dataclass
class _Association:
    calling_ae: str
    # Studies touched, each with its instances by outcome (accepted ones are new).
    studies: dict[UUID, dict[str, int]] = field(default_factory=dict)
    # Every C-STORE by outcome, refused ones (no study) included.
    counts: dict[str, int] = field(default_factory=dict)
    # Shared by the association's audit rows (their request_id).
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


class StoreSCP:
    """One Storage SCP bound to one tenant; ``start()`` returns the running server."""

    def __init__(
        self,
        pool: ConnectionPool,
        store: ObjectStore,
        redis: Redis,
        queue_name: str,
        *,
        tenant: str,
        ae_title: str,
        max_pixels: int,
        job_timeout_s: int,
        max_queue_depth: int,
        max_queue_age_s: float,
        calling_aets: tuple[str, ...] = (),
        release_completes: bool = True,
    ) -> None:
        self.pool, self.store, self.redis, self.queue_name = pool, store, redis, queue_name
        self.ae_title = ae_title
        self.max_pixels, self.job_timeout_s = max_pixels, job_timeout_s
        self.gate = backpressure.Gate(max_queue_depth, max_queue_age_s)
        with translate_errors(), pool.connection() as conn:
            tenant_id = ensure_tenant(conn, tenant)
        self.principal = Principal(
            key_id=uuid.uuid4(), tenant_id=tenant_id, name="dimse", role="uploader", kind="service"
        )
        self.calling_aets = calling_aets
        self.release_completes = release_completes
        self._associations: dict[int, _Association] = {}
        self._lock = threading.Lock()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.calling_aets:
            ae.require_calling_aet = list(self.calling_aets)
        return ae

    def start(self, host: str, port: int) -> Any:
        # Each received dataset goes to a temporary file, not memory (process-wide setting;
        # this process only receives): large instances are then streamed to the store.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Private and unknown storage SOP classes are negotiated too, as REST and STOW-RS
        # take them: the ingest decides per instance (an image with pixel data is stored,
        # anything else refused with a reason), not the association.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_RELEASED, self._finished),
            (evt.EVT_ABORTED, self._finished),
        ]
        return self._ae().start_server((host, port), block=False, evt_handlers=handlers)

    def _echo(self, event: Any) -> int:
        return SUCCESS

    def _state(self, event: Any) -> _Association:
        key = id(event.assoc)
        with self._lock:
            if key not in self._associations:
                calling = str(event.assoc.requestor.ae_title).strip()
                self._associations[key] = _Association(calling)
            return self._associations[key]

    def _store(self, event: Any) -> Dataset:
        state = self._state(event)
        try:
            self.gate.check(self.redis, self.queue_name)
            data = Path(event.dataset_path)
            name = f"c-store:{state.calling_ae}:{event.request.AffectedSOPInstanceUID}"
            outcome = ingest.ingest_file(
                self.pool,
                self.store,
                self.principal,
                name,
                data,
                max_pixels=self.max_pixels,
                priority=None,
                source="dimse",
            )
        except MedtriageError as exc:
            log.warning("C-STORE from %s refused: %s", state.calling_ae, exc.message)
            state.counts["refused"] = state.counts.get("refused", 0) + 1
            return _status(dicomweb.OUT_OF_RESOURCES, exc.message)
        except Exception as exc:  # noqa: BLE001 - one bad instance must not end the association
            log.exception("C-STORE from %s failed", state.calling_ae)
            return _status(dicomweb.PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")
        metrics.observe_upload("dimse", outcome.outcome, data.stat().st_size)
        state.counts[outcome.outcome] = state.counts.get(outcome.outcome, 0) + 1
        if outcome.study_id is not None:
            study = state.studies.setdefault(outcome.study_id, {})
            study[outcome.outcome] = study.get(outcome.outcome, 0) + 1
            if outcome.outcome == ingest.ACCEPTED:  # restarts the study's stable-age clock
                try:
                    ingest.record_arrival(
                        self.pool, outcome.study_id, source="dimse", instances=1, complete=False
                    )
                except MedtriageError as exc:
                    # Stored but not yet listed: the association's release lists it.
                    log.warning("arrival of %s not recorded: %s", outcome.study_id, exc.message)
        if outcome.outcome == ingest.REJECTED:
            # The comment is short (64 characters): the reason without the file name.
            reason = (outcome.reason or "refused").removeprefix(f"{name}: ")
            return _status(dicomweb.failure_reason(outcome.category), reason)
        if outcome.outcome == ingest.DUPLICATE:
            return _status(SUCCESS, DUPLICATE_COMMENT)
        return _status(SUCCESS)

    def _finished(self, event: Any) -> None:
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
        if state is None:
            return
        released = event.event.name == "EVT_RELEASED"
        # Each step on its own: a failure to queue must not lose the audit rows, nor the
        # reverse. The audit rows come last, so their time marks the association's end.
        try:
            for study_id, counts in state.studies.items():
                if counts.get(ingest.ACCEPTED):
                    ingest.record_arrival(
                        self.pool,
                        study_id,
                        source="dimse",
                        instances=0,
                        complete=self.release_completes and released,
                    )
        except Exception:  # noqa: BLE001 - logged; the stored instances stay and can be requeued
            log.exception("queueing after the association from %s failed", state.calling_ae)
        try:
            with translate_errors(), self.pool.connection() as conn:
                record_upload(
                    conn,
                    studies=state.studies,
                    tenant_id=self.principal.tenant_id,
                    principal=f"dimse:{state.calling_ae}",
                    action="study.dimse",
                    request_id=state.id,
                    detail={"counts": state.counts, "released": released},
                )
        except Exception:  # noqa: BLE001 - logged; nothing stored depends on the audit row
            log.exception("auditing the association from %s failed", state.calling_ae)


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        # LO: no backslashes or control characters.
        text = "".join(c if 32 <= ord(c) < 127 and c != "\\" else " " for c in comment)
        status.ErrorComment = _shorten(" ".join(text.split()), _COMMENT_MAX)
    return status


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at a word boundary (never inside a number)."""
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut if cut else text[:limit]
