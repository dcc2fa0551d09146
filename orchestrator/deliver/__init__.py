"""Sending results out: signed webhooks, PACS export (C-STORE of SR/SC), stage events for the
Server-Sent Events streams."""
