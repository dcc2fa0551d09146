-- Per-webhook delivery policy (the client chooses within the API's bounds) and a delivery's
-- lease: a dispatcher claims a delivery by moving next_attempt_at past the attempt's deadline.
-- PACS targets for report export.
ALTER TABLE webhooks
    -- Attempts before a delivery is dead (dead-letter list; redelivery on request).
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 6 CHECK (max_attempts BETWEEN 1 AND 20),
    -- Wait after the first failure; doubles per failure, capped by the dispatcher.
    ADD COLUMN backoff_s double precision NOT NULL DEFAULT 10 CHECK (backoff_s > 0),
    -- Deadline of one HTTP attempt (connect + response).
    ADD COLUMN timeout_s double precision NOT NULL DEFAULT 5 CHECK (timeout_s > 0 AND timeout_s <= 30);

ALTER TABLE webhook_deliveries ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

-- PACS targets per tenant for report export (DICOMweb STOW-RS base URL, e.g.
-- http://pacs:8042/dicom-web); report_exports (0005) records every attempt.
CREATE TABLE pacs_targets (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id),
    name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    stow_url    text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
ALTER TABLE report_exports ADD COLUMN sop_instance_uid text;
