-- Legal hold (issue 23): who put a study on hold, when and why, shown in the list of held
-- studies; the audit trail keeps every hold and release with its reason.
ALTER TABLE studies
    ADD COLUMN legal_hold_reason text,
    ADD COLUMN legal_hold_by text,
    ADD COLUMN legal_hold_at timestamptz;
CREATE INDEX studies_legal_hold ON studies (tenant_id) WHERE legal_hold;
