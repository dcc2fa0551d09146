"""PostgreSQL access: a connection pool, numbered migrations, and the SQL per noun."""

from __future__ import annotations

from orchestrator.db.migrate import upgrade
from orchestrator.db.pool import connect_pool, translate_errors

__all__ = ["connect_pool", "translate_errors", "upgrade"]
