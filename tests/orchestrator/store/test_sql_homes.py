"""SQL lives in store/db/ (one module per table family) and lifecycle.py: the folders a
study flows through before and after the database hold none of their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import orchestrator

PACKAGE = Path(orchestrator.__file__).parent
# A statement run on a connection or cursor.
_SQL = re.compile(r"\b(conn|cur|cursor)\.execute\(")
# Folders already free of SQL; privacy/, security/, cli/security.py and
# api/metrics_collectors.py still hold statements of their own tables.
SQL_FREE = [
    "api/routes",
    "ingest",
    "queue",
    "pipeline",
    "inference",
    "triage",
    "reports",
    "deliver",
]


@pytest.mark.parametrize("folder", SQL_FREE)
def test_no_sql_outside_store(folder: str) -> None:
    offenders = sorted(
        str(path.relative_to(PACKAGE))
        for path in (PACKAGE / folder).rglob("*.py")
        if _SQL.search(path.read_text())
    )
    assert offenders == []
