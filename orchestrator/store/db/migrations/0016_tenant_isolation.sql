-- medtriage schema 0016 (issue 16): platform-scoped roles, per-target plain http, audit anchors.
--
-- Platform-scoped roles. Model routes, shadows, thresholds
-- and the versions loaded in Triton are shared by every tenant; only a platform key may change
-- them, so a tenant's ml-engineer or admin can no longer change what other tenants get.
ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_role_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check CHECK (role IN (
    'uploader', 'reviewer', 'ml-engineer', 'sre', 'admin',
    'platform-ml-engineer', 'platform-admin'
));

-- Outbound targets are https only; plain http only where an admin allowed it for the target
-- (orchestrator/security/outbound.py). Existing plain-http targets are refused at send time
-- until an admin registers them again with allow_http.
ALTER TABLE webhooks ADD COLUMN allow_http boolean NOT NULL DEFAULT false;
ALTER TABLE pacs_targets ADD COLUMN allow_http boolean NOT NULL DEFAULT false;

-- The index of the audit chain's anchors in the object store (security/anchors.py); the
-- objects, MACed with a key the database never sees, are what `audit verify` trusts.
CREATE TABLE audit_anchors (
    n         bigint PRIMARY KEY,
    seq       bigint NOT NULL,
    row_hash  text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT ON audit_anchors TO medtriage_app;
