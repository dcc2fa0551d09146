-- medtriage schema, version 1: the walking skeleton's data model, shaped for what comes next
-- (tenants, model versions and traffic arms, review cases, audit).

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL REFERENCES tenants(id),
    name          text NOT NULL,
    -- Public, non-secret part of the key, used to look the row up.
    prefix        text NOT NULL UNIQUE,
    -- SHA-256 of the whole key; the key itself is shown once and never stored.
    key_hash      bytea NOT NULL,
    role          text NOT NULL CHECK (role IN ('uploader', 'reviewer', 'ml-engineer', 'sre', 'admin')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);

CREATE TABLE studies (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL REFERENCES tenants(id),
    study_uid    text NOT NULL,
    status       text NOT NULL CHECK (status IN ('received', 'queued', 'processing', 'done', 'failed', 'needs_review')),
    -- 'stat' studies are sent to Triton at priority 1.
    priority     text NOT NULL DEFAULT 'routine' CHECK (priority IN ('routine', 'stat')),
    created_by   uuid REFERENCES api_keys(id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    queued_at    timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    error        text,
    -- Milliseconds per stage: store, queue_wait, fetch, preprocess, triage, analysis, report, total.
    timings      jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (tenant_id, study_uid)
);
CREATE INDEX studies_tenant_created ON studies (tenant_id, created_at DESC, id);
CREATE INDEX studies_status ON studies (status);

CREATE TABLE series (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    study_id    uuid NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    series_uid  text NOT NULL,
    modality    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (study_id, series_uid)
);

CREATE TABLE instances (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    study_id             uuid NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    series_id            uuid NOT NULL REFERENCES series(id) ON DELETE CASCADE,
    sop_uid              text NOT NULL,
    sop_class_uid        text NOT NULL,
    transfer_syntax_uid  text,
    rows                 integer,
    columns              integer,
    frames               integer,
    object_key           text NOT NULL,
    size_bytes           bigint NOT NULL,
    sha256               text NOT NULL,
    preview_key          text,
    status               text NOT NULL DEFAULT 'stored' CHECK (status IN ('stored', 'done', 'failed')),
    error                text,
    warnings             text[] NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (study_id, sop_uid)
);

-- Model versions known to the platform and how traffic is split between them.
CREATE TABLE model_versions (
    model       text NOT NULL,
    version     integer NOT NULL,
    state       text NOT NULL DEFAULT 'available' CHECK (state IN ('available', 'loaded', 'unloaded', 'retired')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

CREATE TABLE model_routes (
    model       text NOT NULL,
    version     integer NOT NULL,
    -- Live arms' weights sum to 100 per model; shadow arms carry weight 0.
    weight      integer NOT NULL CHECK (weight BETWEEN 0 AND 100),
    shadow      boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text,
    PRIMARY KEY (model, version),
    FOREIGN KEY (model, version) REFERENCES model_versions(model, version)
);

CREATE TABLE jobs (
    id           text PRIMARY KEY,             -- derived from the work: study id + stage
    study_id     uuid NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    stage        text NOT NULL,
    status       text NOT NULL CHECK (status IN ('queued', 'started', 'finished', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE job_attempts (
    id           bigserial PRIMARY KEY,
    job_id       text NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    worker       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    outcome      text CHECK (outcome IN ('finished', 'failed')),
    error        text,
    UNIQUE (job_id, attempt)
);

CREATE TABLE results (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    study_id     uuid NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    instance_id  uuid NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    model        text NOT NULL,
    version      integer NOT NULL,
    -- 'live' results are returned to clients; 'shadow' ones are recorded only.
    arm          text NOT NULL CHECK (arm IN ('live', 'shadow')),
    label        text NOT NULL,
    confidence   double precision NOT NULL,
    outputs      jsonb NOT NULL,
    findings     jsonb NOT NULL DEFAULT '[]'::jsonb,
    latency_ms   double precision NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (instance_id, model, version)
);
CREATE INDEX results_study ON results (study_id);

CREATE TABLE review_cases (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL REFERENCES tenants(id),
    study_id     uuid NOT NULL UNIQUE REFERENCES studies(id) ON DELETE CASCADE,
    reasons      text[] NOT NULL,
    urgency      integer NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'claimed', 'closed')),
    claimed_by   uuid REFERENCES api_keys(id),
    claimed_at   timestamptz,
    verdict      text CHECK (verdict IN ('agree', 'override')),
    correct_label text,
    note         text,
    closed_at    timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reports (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    study_id     uuid NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    revision     integer NOT NULL,
    format       text NOT NULL,
    object_key   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (study_id, revision, format)
);

-- Append-only record of who did what to which resource.
CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    tenant_id      uuid,
    principal_id   uuid,
    principal      text NOT NULL,
    action         text NOT NULL,
    resource_type  text NOT NULL,
    resource_id    text,
    outcome        text NOT NULL,
    request_id     text,
    source_ip      text,
    detail         jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_resource ON audit_log (resource_type, resource_id);
