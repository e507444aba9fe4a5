-- Jobs: the truth about every job. Valkey only indexes the live ones.
CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    queue            text        NOT NULL,
    kind             text        NOT NULL,
    status           text        NOT NULL
        CHECK (status IN ('queued', 'scheduled', 'running', 'succeeded', 'dead', 'cancelled')),
    stage            text,
    priority         smallint    NOT NULL CHECK (priority BETWEEN 1 AND 10),
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Attempts started so far; the current one while running.
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    backoff_base_ms  bigint      NOT NULL CHECK (backoff_base_ms >= 1),
    backoff_cap_ms   bigint      NOT NULL CHECK (backoff_cap_ms >= backoff_base_ms),
    timeout_secs     integer     NOT NULL CHECK (timeout_secs >= 1),
    -- Fencing token: incremented by every claim. A worker may only change a
    -- running job while it holds the current lease_id and the lease is alive.
    lease_id         bigint      NOT NULL DEFAULT 0,
    worker_id        text,
    lease_expires_at timestamptz,
    run_at           timestamptz NOT NULL,
    idempotency_key  text,
    last_error       text,
    result           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
) WITH (fillfactor = 80);

-- Live jobs by status in id order: the reconciler pages through queued and
-- scheduled ones, the reaper reads the running ones (few: at most the
-- workers' slots) for expired leases. One index for both keeps the cost of
-- every status change down.
CREATE INDEX jobs_live_idx ON jobs (status, id)
    WHERE status IN ('queued', 'scheduled', 'running');
CREATE UNIQUE INDEX jobs_idempotency_key_idx ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The append-only audit trail. No foreign key on purpose: the trail outlives
-- job rows removed by retention, and every insert happens in the transaction
-- that holds the job's row lock. Events are always read per job, so the one
-- index is (job_id, id); `id` is unique by construction (identity), and a
-- second index just for it would cost every transition an extra write.
CREATE TABLE job_events (
    id      bigint      GENERATED ALWAYS AS IDENTITY,
    job_id  uuid        NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    type    text        NOT NULL,
    actor   text        NOT NULL,
    data    jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX job_events_job_idx ON job_events (job_id, id);

CREATE FUNCTION job_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job_events is append-only';
END;
$$;
CREATE TRIGGER job_events_no_update BEFORE UPDATE ON job_events
    FOR EACH ROW EXECUTE FUNCTION job_events_append_only();
