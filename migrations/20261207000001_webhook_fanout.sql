-- The webhook outbox in two steps. A transition used to write one delivery
-- row per reported event and URL, three index entries each, inside its own
-- transaction: measured, that was what webhooks still cost the queue. Now
-- the trigger writes one `webhook_fanout` row per statement, holding the
-- statement's reported events as arrays, and the deliverers fan those out
-- into `webhook_deliveries` (one row per event and URL, as before) later,
-- in order, off the transition's path. The fan-out row is written in the
-- transition's transaction, so a transition without its webhook still
-- cannot exist; it is deleted in the transaction that writes its delivery
-- rows, so none is lost or fanned out twice.
CREATE TABLE webhook_fanout (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- When the row was written, not when its transaction began: what the
    -- deferral ("rows older than x") and the subscriptions' "made before
    -- the events" compare with. (Order is by id, not by this.) Deliveries
    -- take it as their created_at and first next_at.
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- One entry per reported event, in the event's order: the job, the
    -- job_events row, the event as reported (`lease_expired` is `failed`
    -- or `dead`), and the status and version the transition left.
    job_ids    uuid[]      NOT NULL,
    event_ids  bigint[]    NOT NULL,
    events     text[]      NOT NULL,
    statuses   text[]      NOT NULL,
    versions   bigint[]    NOT NULL,
    CHECK (cardinality(job_ids) = cardinality(event_ids)
           AND cardinality(job_ids) = cardinality(events)
           AND cardinality(job_ids) = cardinality(statuses)
           AND cardinality(job_ids) = cardinality(versions))
);

-- The reported events of a statement that anyone listens to (the job has a
-- callback_url, or a subscription matches), as one fan-out row. Which URLs
-- they go to is settled at fan-out: a subscription made in between is not
-- sent events older than itself, and one deleted in between gets nothing.
-- No statement writes two reported events of one job, so a stream's order
-- is the order of the rows: every writer of a reported event holds the
-- job's row lock (the transitions' SELECT … FOR UPDATE), so a job's later
-- transition takes its id (from the identity, without a cache) after the
-- earlier one committed. Events written without that lock (the worker's
-- log and note appends) are never reported.
CREATE OR REPLACE FUNCTION job_events_to_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_fanout (job_ids, event_ids, events, statuses, versions)
    SELECT array_agg(e.job_id ORDER BY e.id), array_agg(e.id ORDER BY e.id),
           array_agg(r.type ORDER BY e.id), array_agg(j.status ORDER BY e.id),
           array_agg(j.version ORDER BY e.id)
    FROM new_events e
    -- One lookup by primary key per event. As a plain join, the plan this
    -- function keeps for its session was made while `jobs` was small and
    -- hashed the whole table on every statement once it had grown (35% of
    -- the queue's throughput, measured); OFFSET 0 keeps the subquery a
    -- subquery, so the lookup stays a lookup.
    CROSS JOIN LATERAL (
        SELECT j.status, j.version, j.callback_url, j.queue, j.kind
        FROM jobs j WHERE j.id = e.job_id OFFSET 0
    ) j
    CROSS JOIN LATERAL (
        SELECT CASE WHEN e.type <> 'lease_expired' THEN e.type
                    WHEN j.status = 'dead' THEN 'dead' ELSE 'failed' END AS type
    ) r
    WHERE e.type IN ('started', 'progress', 'succeeded', 'failed', 'dead', 'cancelled',
                     'lease_expired')
      AND (j.callback_url IS NOT NULL
           OR EXISTS (SELECT 1 FROM webhooks w
                      WHERE r.type = ANY (w.events)
                        AND (w.queues IS NULL OR j.queue = ANY (w.queues))
                        AND (w.kinds IS NULL OR j.kind = ANY (w.kinds))))
    HAVING count(*) > 0;
    RETURN NULL;
END;
$$;

-- The advisory lock a fan-out pass holds, and a retention batch waits for
-- (pg_try_advisory_xact_lock keys are bigints; this one reads "orchfano").
CREATE FUNCTION webhook_fanout_lock() RETURNS bigint LANGUAGE sql IMMUTABLE
AS $$ SELECT 8030590385600425583::bigint $$;

-- One fan-out pass. Under the fan-out lock (none when another replica
-- holds it: one pass at a time, so streams never interleave), takes the
-- oldest `max_rows` fan-out rows by id, cut at the first one written less
-- than `min_age` ago, so that a job's events reach webhook_deliveries in
-- order; writes their delivery rows in that order and deletes them.
-- Returns the fan-out rows taken and the delivery rows made, or no row
-- when the lock was held.
--
-- plpgsql soon settles on a generic plan for each statement, made without
-- knowing `max_rows` or how large the tables are: each statement here
-- reads by primary key, or in id order under a LIMIT, so that the plan
-- stays an index scan whatever the estimates (a first version, one SQL
-- statement, deleted through a sequential scan of the backlog and
-- compiled it with JIT on every pass: 450 ms a pass at 200,000 rows; this
-- one takes 1-2 ms there, measured). JIT is off for the same reason: its
-- cost estimate is of that generic plan.
CREATE FUNCTION fan_out_webhooks(min_age interval, max_rows integer)
RETURNS TABLE (taken bigint, made bigint) LANGUAGE plpgsql
SET jit = off AS $$
DECLARE
    ids bigint[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(webhook_fanout_lock()) THEN
        RETURN;
    END IF;
    SELECT array_agg(c.id ORDER BY c.id) INTO ids
    FROM (
        SELECT o.id,
               bool_or(o.created_at > now() - min_age) OVER (ORDER BY o.id) AS cut
        FROM (SELECT f.id, f.created_at FROM webhook_fanout f ORDER BY f.id LIMIT max_rows) o
    ) c
    WHERE NOT c.cut;
    taken := COALESCE(cardinality(ids), 0);
    made := 0;
    IF taken > 0 THEN
        WITH batch AS (
            DELETE FROM webhook_fanout f WHERE f.id = ANY (ids) RETURNING f.*
        ), made_rows AS (
            INSERT INTO webhook_deliveries
                (job_id, webhook_id, event, url, event_id, status, version, next_at, created_at)
            SELECT u.job_id, t.webhook_id, u.event, t.url, u.event_id, u.status, u.version,
                   b.created_at, b.created_at
            FROM batch b
            CROSS JOIN LATERAL unnest(b.job_ids, b.event_ids, b.events, b.statuses, b.versions)
                WITH ORDINALITY AS u(job_id, event_id, event, status, version, n)
            -- A lookup by primary key (OFFSET 0: see the trigger); a job
            -- pruned since its events were written gets nothing.
            CROSS JOIN LATERAL (
                SELECT jj.callback_url, jj.queue, jj.kind
                FROM jobs jj WHERE jj.id = u.job_id OFFSET 0
            ) j
            CROSS JOIN LATERAL (
                SELECT '00000000-0000-0000-0000-000000000000'::uuid AS webhook_id,
                       j.callback_url AS url
                WHERE j.callback_url IS NOT NULL
                UNION ALL
                SELECT w.id, w.url
                FROM webhooks w
                WHERE u.event = ANY (w.events)
                  AND (w.queues IS NULL OR j.queue = ANY (w.queues))
                  AND (w.kinds IS NULL OR j.kind = ANY (w.kinds))
                  AND w.created_at <= b.created_at
            ) t
            -- Delivery ids follow this order: a stream's rows are claimed
            -- in id order.
            ORDER BY b.id, u.n, t.webhook_id
            RETURNING 1
        )
        SELECT count(*) INTO made FROM made_rows;
    END IF;
    RETURN NEXT;
END;
$$;

-- Retention as before (`20261206000003`), and in turn with fan-out passes:
-- a job's delivery rows are deleted with it, and none is made after.
CREATE OR REPLACE FUNCTION prune_finished_jobs(p_status text, p_cutoff timestamptz, p_batch integer,
                                    p_queue text DEFAULT NULL)
RETURNS TABLE (pruned_jobs bigint, pruned_events bigint) LANGUAGE plpgsql AS $$
DECLARE
    doomed uuid[];
BEGIN
    -- A fan-out pass that read a doomed job before this commits would
    -- write delivery rows for it after: wait for the pass to end, and hold
    -- the next one off until this batch is done.
    PERFORM pg_advisory_xact_lock(webhook_fanout_lock());
    SELECT array_agg(id) INTO doomed FROM (
        SELECT id FROM jobs
        WHERE finished_at IS NOT NULL AND finished_at < p_cutoff AND status = p_status
          AND (p_queue IS NULL OR queue = p_queue)
        ORDER BY finished_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ) AS d;
    IF doomed IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    DELETE FROM job_events WHERE job_id = ANY(doomed);
    GET DIAGNOSTICS pruned_events = ROW_COUNT;
    DELETE FROM webhook_attempts WHERE delivery_id IN
        (SELECT id FROM webhook_deliveries WHERE job_id = ANY(doomed));
    DELETE FROM webhook_deliveries WHERE job_id = ANY(doomed);
    DELETE FROM jobs WHERE id = ANY(doomed);
    GET DIAGNOSTICS pruned_jobs = ROW_COUNT;
    RETURN NEXT;
END;
$$;
