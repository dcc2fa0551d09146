"""The study lifecycle has one owner: orchestrator/lifecycle.py holds every status, every state
set and every write of ``studies.status``."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator import lifecycle
from orchestrator.lifecycle import StudyStatus

PACKAGE = Path(lifecycle.__file__).parent

# An UPDATE of studies that sets status, or an INSERT of a study row, in SQL text.
_WRITES_STATUS = re.compile(
    r"UPDATE\s+studies\s+SET\b[^;\"]*\bstatus\s*=|INSERT\s+INTO\s+studies\b", re.IGNORECASE
)


def test_only_lifecycle_writes_study_status() -> None:
    writers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "lifecycle.py" and _WRITES_STATUS.search(path.read_text())
    )
    assert writers == []


def test_state_sets_partition_the_statuses() -> None:
    every = set(StudyStatus)
    assert set(lifecycle.OPEN) | set(lifecycle.TERMINAL) == every
    assert not set(lifecycle.OPEN) & set(lifecycle.TERMINAL)
    assert set(lifecycle.CLAIMABLE) <= set(lifecycle.OPEN)
    assert {s.value for s in lifecycle.TERMINAL} == lifecycle.TERMINAL_VALUES
    assert {s.value for s in lifecycle.OPEN} == lifecycle.OPEN_VALUES
    # A study already queued or running is never queued again by ``queue``; a finished one
    # that gains instances is, except not_applicable (its images never meet a model set).
    assert set(lifecycle.QUEUEABLE) == every - {
        StudyStatus.QUEUED,
        StudyStatus.PROCESSING,
        StudyStatus.NOT_APPLICABLE,
    }


def test_statuses_are_stored_as_text() -> None:
    assert [s.value for s in StudyStatus] == [
        "received",
        "queued",
        "processing",
        "done",
        "failed",
        "needs_review",
        "not_applicable",
    ]
    assert StudyStatus("needs_review") is StudyStatus.NEEDS_REVIEW
