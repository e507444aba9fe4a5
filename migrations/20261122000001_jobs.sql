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
) WITH (fillfactor = 40);
-- fillfactor 40 leaves room in every page for the new row versions of a
-- job's transitions, so they are HOT updates: no index entry is written for
-- a claim, the most frequent change. That is also why no index covers
-- `status`, `lease_expires_at` or any other column a claim changes.

-- Unfinished jobs (queued, scheduled, running) in id order, for the
-- reconciler and the scan for lost leases. Only finishing a job leaves it.
CREATE INDEX jobs_unfinished_idx ON jobs (id) WHERE finished_at IS NULL;
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
