-- Per-webhook delivery policy (the client chooses within the API's bounds) and a delivery's
-- lease: a dispatcher claims a delivery by moving next_attempt_at past the attempt's deadline.
ALTER TABLE webhooks
    -- Attempts before a delivery is dead (dead-letter list; redelivery on request).
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 6 CHECK (max_attempts BETWEEN 1 AND 20),
    -- Wait after the first failure; doubles per failure, capped by the dispatcher.
    ADD COLUMN backoff_s double precision NOT NULL DEFAULT 10 CHECK (backoff_s > 0),
    -- Deadline of one HTTP attempt (connect + response).
    ADD COLUMN timeout_s double precision NOT NULL DEFAULT 5 CHECK (timeout_s > 0 AND timeout_s <= 30);

ALTER TABLE webhook_deliveries ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
