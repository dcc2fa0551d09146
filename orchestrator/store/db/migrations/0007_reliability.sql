-- Reliability (issue 9): run claims for exactly-once effects, and the dead-letter list.

-- The run that last moved a study to 'processing' holds this token; only that run may write the
-- report and the final status, so two deliveries of one job produce one report.
ALTER TABLE studies ADD COLUMN claim_token uuid;

-- Studies the platform stopped retrying (attempts exhausted), with the reason, until requeued.
CREATE TABLE dead_letters (
    study_id     uuid PRIMARY KEY REFERENCES studies(id) ON DELETE CASCADE,
    tenant_id    uuid NOT NULL REFERENCES tenants(id),
    job_id       text NOT NULL,
    reason       text NOT NULL,
    attempts     integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_created ON dead_letters (created_at DESC);
