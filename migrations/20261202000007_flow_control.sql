-- Flow control and time: unique jobs, concurrency keys, schedules, and the
-- retention that prunes finished jobs.

-- `unique_key`: at most one job with this key in the states its request
-- named, within its window (checked at enqueue under an advisory lock on
-- the key; see Store::insert_jobs). `concurrency_key`: jobs sharing one
-- run at most `concurrency_limit` at once (the claim script enforces it;
-- the columns rebuild it after Valkey lost its data). `schedule_id` and
-- `scheduled_for`: the
-- schedule and tick that enqueued the job. All nullable without defaults:
-- catalogue-only changes.
ALTER TABLE jobs
    ADD COLUMN unique_key text CHECK (unique_key IS NULL OR octet_length(unique_key) <= 255),
    ADD COLUMN concurrency_key text
        CHECK (concurrency_key IS NULL OR octet_length(concurrency_key) <= 1024),
    ADD COLUMN concurrency_limit integer CHECK (concurrency_limit >= 1),
    ADD CONSTRAINT jobs_concurrency CHECK ((concurrency_key IS NULL) = (concurrency_limit IS NULL)),
    ADD COLUMN schedule_id uuid,
    ADD COLUMN scheduled_for timestamptz,
    ADD CONSTRAINT jobs_schedule_tick CHECK ((schedule_id IS NULL) = (scheduled_for IS NULL));

-- None of these columns changes after insert, so these indexes cost an
-- enqueue (of such jobs only: partial) and never a claim's HOT update.
CREATE INDEX jobs_unique_key_idx ON jobs (unique_key, created_at)
    WHERE unique_key IS NOT NULL;
-- The claim counts a key's running jobs (see over_key_limits): only
-- unfinished keyed jobs are in it, and a claim changes none of its columns.
CREATE INDEX jobs_concurrency_key_idx ON jobs (concurrency_key)
    WHERE concurrency_key IS NOT NULL AND finished_at IS NULL;
-- Exactly one job per schedule and tick, whatever the replicas do: the
-- scheduler's row lock decides who enqueues a tick, this index makes a
-- second job for it impossible.
CREATE UNIQUE INDEX jobs_schedule_tick_idx ON jobs (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL;

-- Schedules (POST /v1/schedules): a cron expression in a time zone, and
-- the job (as POST /v1/jobs takes it) every tick enqueues. `next_tick` is
-- the first tick not handled yet; the scheduler of any replica takes due
-- rows FOR UPDATE SKIP LOCKED, enqueues, and moves it on in one
-- transaction.
CREATE TABLE schedules (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE CHECK (char_length(name) BETWEEN 1 AND 200),
    cron        text        NOT NULL CHECK (octet_length(cron) <= 200),
    timezone    text        NOT NULL CHECK (octet_length(timezone) <= 64),
    job         jsonb       NOT NULL,
    paused      boolean     NOT NULL DEFAULT false,
    overlap     text        NOT NULL CHECK (overlap IN ('skip', 'allow')),
    catch_up    text        NOT NULL CHECK (catch_up IN ('none', 'latest', 'all')),
    catch_up_limit integer  NOT NULL CHECK (catch_up_limit BETWEEN 1 AND 1000),
    next_tick   timestamptz,
    last_tick   timestamptz,
    last_job_id uuid,
    last_error  text,
    version     bigint      NOT NULL DEFAULT 1,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due_idx ON schedules (next_tick) WHERE NOT paused;

-- Retention. The trail stays append-only: no UPDATE (the first migration),
-- and no DELETE or TRUNCATE but the pruning below, which marks its own
-- transaction. Statement-level, so a prune of a million rows pays one call.
CREATE FUNCTION job_events_prune_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('orchestrator.pruning', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'job_events is append-only; only prune_finished_jobs() deletes from it';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_events_no_delete BEFORE DELETE OR TRUNCATE ON job_events
    FOR EACH STATEMENT EXECUTE FUNCTION job_events_prune_only();

-- Deletes up to `batch` finished jobs of one status that finished before
-- `cutoff`, oldest first, with their events and webhook rows. Rows another
-- transaction holds are skipped. Returns the jobs and events deleted.
CREATE FUNCTION prune_finished_jobs(p_status text, p_cutoff timestamptz, p_batch integer)
RETURNS TABLE (pruned_jobs bigint, pruned_events bigint) LANGUAGE plpgsql AS $$
DECLARE
    doomed uuid[];
BEGIN
    SELECT array_agg(id) INTO doomed FROM (
        SELECT id FROM jobs
        WHERE finished_at IS NOT NULL AND finished_at < p_cutoff AND status = p_status
        ORDER BY finished_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ) AS d;
    IF doomed IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    PERFORM set_config('orchestrator.pruning', 'on', true);
    DELETE FROM job_events WHERE job_id = ANY(doomed);
    GET DIAGNOSTICS pruned_events = ROW_COUNT;
    PERFORM set_config('orchestrator.pruning', 'off', true);
    DELETE FROM webhook_attempts WHERE delivery_id IN
        (SELECT id FROM webhook_deliveries WHERE job_id = ANY(doomed));
    DELETE FROM webhook_deliveries WHERE job_id = ANY(doomed);
    DELETE FROM jobs WHERE id = ANY(doomed);
    GET DIAGNOSTICS pruned_jobs = ROW_COUNT;
    RETURN NEXT;
END;
$$;
