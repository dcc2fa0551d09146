"""Where things are kept: the object store (originals, previews, reports; ``objects``), its
encryption at rest (``encryption``) and PostgreSQL (``db/``, one module per table family)."""
