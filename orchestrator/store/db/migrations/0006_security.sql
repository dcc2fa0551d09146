-- medtriage schema 0006: patient data protection.
--   * audit_log becomes append-only (a trigger refuses UPDATE/DELETE/TRUNCATE, binding even
--     superusers; the application role is granted only SELECT/INSERT on it) and hash-chained
--     (seq, prev_hash, row_hash computed under an advisory lock so the chain stays linear);
--   * per-tenant retention policies and a legal hold on studies;
--   * break-glass grants and people's sessions (idle / absolute lifetimes).

-- ---------------------------------------------------------------- audit hash chain
ALTER TABLE audit_log
    ADD COLUMN seq        bigint,
    ADD COLUMN prev_hash  text,
    ADD COLUMN row_hash   text;

-- The canonical text of a row that its hash covers. jsonb's text form is deterministic (keys
-- sorted), and the time is written in UTC so the session's TimeZone cannot change it.
CREATE FUNCTION audit_canonical(r audit_log) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'seq', r.seq,
        'id', r.id,
        'at', to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        'tenant_id', r.tenant_id,
        'principal_id', r.principal_id,
        'principal', r.principal,
        'action', r.action,
        'resource_type', r.resource_type,
        'resource_id', r.resource_id,
        'outcome', r.outcome,
        'request_id', r.request_id,
        'source_ip', r.source_ip,
        'detail', r.detail
    )::text
$$;

-- Lock id for the chain head: every insert takes it (transaction-scoped), so seq/prev_hash
-- are assigned in commit order and the chain never forks.
CREATE FUNCTION audit_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    last_seq  bigint;
    last_hash text;
BEGIN
    PERFORM pg_advisory_xact_lock(7165437204);  -- 'audit' chain head
    SELECT seq, row_hash INTO last_seq, last_hash
      FROM audit_log WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1;
    NEW.seq := coalesce(last_seq, 0) + 1;
    NEW.prev_hash := coalesce(last_hash, repeat('0', 64));
    NEW.row_hash := encode(sha256(convert_to(audit_canonical(NEW) || NEW.prev_hash, 'UTF8')), 'hex');
    RETURN NEW;
END
$$;

CREATE FUNCTION audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Chain the rows written before this migration, in id order.
DO $$
DECLARE
    r audit_log;
    h text := repeat('0', 64);
    n bigint := 0;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY id LOOP
        n := n + 1;
        r.seq := n;
        r.prev_hash := h;
        r.row_hash := encode(sha256(convert_to(audit_canonical(r) || h, 'UTF8')), 'hex');
        UPDATE audit_log SET seq = r.seq, prev_hash = r.prev_hash, row_hash = r.row_hash
         WHERE id = r.id;
        h := r.row_hash;
    END LOOP;
END
$$;

ALTER TABLE audit_log ALTER COLUMN seq SET NOT NULL,
                      ALTER COLUMN prev_hash SET NOT NULL,
                      ALTER COLUMN row_hash SET NOT NULL;
CREATE UNIQUE INDEX audit_log_seq ON audit_log (seq);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);

CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_chain();
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- ---------------------------------------------------------------- the application role
-- Production runs the API and workers as medtriage_app (LOGIN granted by the operator):
-- it may read and append the audit, never change it.
DO $$
BEGIN
    CREATE ROLE medtriage_app NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- roles are cluster-wide; another database already made it
END
$$;
GRANT USAGE ON SCHEMA public TO medtriage_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO medtriage_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO medtriage_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO medtriage_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO medtriage_app;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM medtriage_app;
REVOKE UPDATE, DELETE, TRUNCATE ON schema_migrations FROM medtriage_app;

-- ---------------------------------------------------------------- retention and legal hold
ALTER TABLE studies ADD COLUMN legal_hold boolean NOT NULL DEFAULT false;

-- One row per tenant and kind of data; a missing row means "keep".
CREATE TABLE retention_policies (
    tenant_id   uuid NOT NULL REFERENCES tenants(id),
    kind        text NOT NULL CHECK (kind IN ('originals', 'previews', 'reports', 'results')),
    max_age     interval NOT NULL CHECK (max_age > interval '0'),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind)
);

-- ---------------------------------------------------------------- break-glass and sessions
CREATE TABLE break_glass_grants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id),
    principal   text NOT NULL,
    role        text NOT NULL,
    reason      text NOT NULL CHECK (length(btrim(reason)) >= 10),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX break_glass_principal ON break_glass_grants (principal, expires_at);

-- People (OIDC bearer tokens): one row per session id; idle and absolute lifetimes apply.
CREATE TABLE user_sessions (
    sid         text PRIMARY KEY,
    subject     text NOT NULL,
    tenant_id   uuid NOT NULL REFERENCES tenants(id),
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);
