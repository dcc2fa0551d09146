"""Ingest: every way a DICOM file arrives (REST upload, STOW-RS, DIMSE C-STORE, folder import)
goes through one core (``core.ingest``) that checks, deduplicates, stores and queues it."""
