"""PostgreSQL access: a connection pool, numbered migrations, and the SQL per noun."""

from __future__ import annotations

from orchestrator.store.db.migrate import upgrade
from orchestrator.store.db.pool import connect_pool, translate_errors

__all__ = ["connect_pool", "translate_errors", "upgrade"]
