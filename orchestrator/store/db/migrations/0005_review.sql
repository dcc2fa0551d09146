-- Confidence gate thresholds, the review loop's details, and report delivery (webhooks).

-- Per model and version gate thresholds; version 0 is the model's default for every version.
CREATE TABLE gate_thresholds (
    model                 text NOT NULL,
    version               integer NOT NULL DEFAULT 0 CHECK (version >= 0),
    -- Top-class confidence below this -> reason low_confidence.
    min_confidence        double precision NOT NULL CHECK (min_confidence BETWEEN 0 AND 1),
    -- Shannon entropy (nats) of the class probabilities above this -> reason high_entropy.
    max_entropy           double precision NOT NULL CHECK (max_entropy >= 0),
    -- A non-normal class probability at or above this -> reason critical_finding (urgent).
    critical_probability  double precision NOT NULL CHECK (critical_probability BETWEEN 0 AND 1),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    updated_by            text,
    PRIMARY KEY (model, version)
);

-- People (OIDC) claim cases too; their principal id is not an api_keys row.
ALTER TABLE review_cases DROP CONSTRAINT IF EXISTS review_cases_claimed_by_fkey;
ALTER TABLE review_cases
    ADD COLUMN claimed_by_name text,
    ADD COLUMN verdict_by uuid,
    ADD COLUMN verdict_by_name text,
    -- What the gate saw: per reason the model, version, arm and value that tripped it.
    ADD COLUMN details jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX review_cases_queue ON review_cases (tenant_id, status, urgency DESC, created_at);

-- Webhook endpoints per tenant. The secret signs payloads (HMAC-SHA256); it is shown once.
CREATE TABLE webhooks (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id),
    url         text NOT NULL,
    secret      text NOT NULL,
    -- Event names delivered (report.created, review.closed); empty = all.
    events      text[] NOT NULL DEFAULT '{}',
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_tenant ON webhooks (tenant_id) WHERE active;

CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id      uuid NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    tenant_id       uuid NOT NULL REFERENCES tenants(id),
    event           text NOT NULL,
    payload         jsonb NOT NULL,
    -- pending -> delivered | dead (after the configured number of failed attempts).
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    last_status     integer,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_tenant ON webhook_deliveries (tenant_id, status, created_at DESC);

-- PACS export of a report (DICOM SR) per study and revision.
CREATE TABLE report_exports (
    id          bigserial PRIMARY KEY,
    study_id    uuid NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    revision    integer NOT NULL,
    target      text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'failed')),
    detail      text,
    at          timestamptz NOT NULL DEFAULT now()
);
