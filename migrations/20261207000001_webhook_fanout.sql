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
    -- When the row was written, not when its transaction began: a later
    -- transition of a job is then never older than an earlier one, which
    -- fanning out "rows older than x" relies on. Deliveries take it as
    -- their created_at and first next_at.
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
-- is the order of the rows; a job's later transition waits for the lock on
-- the job's row, so its row is written after the earlier one committed.
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

-- Fans out the oldest fan-out rows written at least `min_age` ago, at most
-- `max_rows` of them, into delivery rows, and deletes them. Rows are taken
-- in id order and only up to the first one that is too young, so a job's
-- events reach webhook_deliveries in order. The caller holds the fan-out
-- lock, so two replicas never interleave. Returns the delivery rows made.
CREATE FUNCTION fan_out_webhooks(min_age interval, max_rows integer)
RETURNS bigint LANGUAGE sql AS $$
    WITH young AS (
        SELECT min(id) AS id FROM webhook_fanout WHERE created_at > now() - min_age
    ), batch AS (
        DELETE FROM webhook_fanout f
        WHERE f.id IN (
            SELECT o.id FROM webhook_fanout o, young
            WHERE young.id IS NULL OR o.id < young.id
            ORDER BY o.id LIMIT max_rows)
        RETURNING f.*
    ), made AS (
        INSERT INTO webhook_deliveries
            (job_id, webhook_id, event, url, event_id, status, version, next_at, created_at)
        SELECT u.job_id, t.webhook_id, u.event, t.url, u.event_id, u.status, u.version,
               b.created_at, b.created_at
        FROM batch b
        CROSS JOIN LATERAL unnest(b.job_ids, b.event_ids, b.events, b.statuses, b.versions)
            WITH ORDINALITY AS u(job_id, event_id, event, status, version, n)
        JOIN jobs j ON j.id = u.job_id
        CROSS JOIN LATERAL (
            SELECT '00000000-0000-0000-0000-000000000000'::uuid AS webhook_id, j.callback_url AS url
            WHERE j.callback_url IS NOT NULL
            UNION ALL
            SELECT w.id, w.url
            FROM webhooks w
            WHERE u.event = ANY (w.events)
              AND (w.queues IS NULL OR j.queue = ANY (w.queues))
              AND (w.kinds IS NULL OR j.kind = ANY (w.kinds))
              AND w.created_at <= b.created_at
        ) t
        ORDER BY b.id, u.n, t.webhook_id
        RETURNING 1
    )
    SELECT count(*) FROM made;
$$;
