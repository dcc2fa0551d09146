-- Rollout history and promotion gates (issue: versions, A/B split, shadow, promotion).

CREATE TABLE model_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    model       text NOT NULL,
    action      text NOT NULL,          -- route, shadow_add, shadow_remove, load, unload, promote, rollback, failover
    actor       text NOT NULL,
    -- Routes before and after the change, so rollback can restore the previous split.
    before      jsonb NOT NULL DEFAULT '[]'::jsonb,
    after       jsonb NOT NULL DEFAULT '[]'::jsonb,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX model_events_model ON model_events (model, id DESC);

CREATE TABLE model_gates (
    model                 text PRIMARY KEY,
    -- A candidate must have at least this many results before it can be promoted...
    min_results           integer NOT NULL DEFAULT 50,
    -- ...agree with the live arm on at least this share of instances...
    min_agreement         double precision NOT NULL DEFAULT 0.9,
    -- ...and send at most this share of its studies to review.
    max_review_share      double precision NOT NULL DEFAULT 0.5,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
