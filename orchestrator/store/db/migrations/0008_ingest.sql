-- Ingest paths (issue 3): idempotent REST retries and study completeness for instances that
-- arrive over time (STOW-RS, C-STORE).

-- The first answer to a request carrying an Idempotency-Key, per tenant. A retry with the
-- same key and the same content gets this answer again; a different request under the same
-- key is refused. status_code is NULL while the first request is still being processed.
CREATE TABLE idempotency_keys (
    tenant_id       uuid NOT NULL REFERENCES tenants(id),
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    route           text NOT NULL,
    request_sha256  text NOT NULL,
    status_code     integer,
    response        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Studies whose instances arrive one by one: queued once no instance has arrived for the
-- stable age, or at once when the sender says the study is complete.
CREATE TABLE study_arrivals (
    study_id        uuid PRIMARY KEY REFERENCES studies(id) ON DELETE CASCADE,
    first_at        timestamptz NOT NULL DEFAULT now(),
    last_at         timestamptz NOT NULL DEFAULT now(),
    instances       integer NOT NULL DEFAULT 0,
    source          text NOT NULL CHECK (source IN ('stow', 'dimse', 'import', 'rest')),
    complete        boolean NOT NULL DEFAULT false
);
CREATE INDEX study_arrivals_last ON study_arrivals (last_at);
