-- Webhooks: a job's own callback_url, deployment-wide subscriptions, and the
-- transactional outbox of their deliveries.

-- Where a job's events are POSTed (canonical http/https URL, checked by the
-- address policy at enqueue and again at every send). Nullable without a
-- default: a catalogue-only change.
ALTER TABLE jobs ADD COLUMN callback_url text
    CHECK (callback_url IS NULL OR octet_length(callback_url) <= 2048);

-- Subscriptions made with POST /v1/webhooks: every event of the named kinds,
-- for jobs of the named queues and kinds (NULL: all of them).
CREATE TABLE webhooks (
    id          uuid        PRIMARY KEY,
    url         text        NOT NULL CHECK (octet_length(url) <= 2048),
    events      text[]      NOT NULL CHECK (
        cardinality(events) > 0
        AND events <@ ARRAY['started', 'progress', 'succeeded', 'failed', 'dead',
                            'cancelled', 'engaged', 'lifted']),
    queues      text[],
    kinds       text[],
    description text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 500),
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The outbox: one row per event and URL, written by the triggers below in
-- the transaction of the transition it reports, so a transition without
-- its webhook cannot exist. `message_id` is the webhook-id every attempt of
-- the row sends, so receivers can drop a redelivery. `job_id` is the nil
-- UUID for the kill switch's events, `webhook_id` the nil UUID for a job's
-- own callback_url; together they name the ordered stream a row belongs to
-- (a row waits for the earlier undelivered rows of its stream). No foreign
-- keys: the outbox outlives the rows it speaks of, as the audit trail does.
-- Every index here is paid by every transition a webhook reports, so there
-- are three, and none on text (a collated comparison per entry cost more
-- than the row itself when measured).
CREATE TABLE webhook_deliveries (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  uuid        NOT NULL DEFAULT gen_random_uuid(),
    job_id      uuid        NOT NULL,
    webhook_id  uuid        NOT NULL,
    event       text        NOT NULL,
    url         text        NOT NULL,
    -- The event reported (its job_events id; NULL for the kill switch's),
    -- and the job's status and version as the transition left them.
    event_id    bigint,
    status      text,
    version     bigint,
    -- Written at the first claim from the columns above, the event's row
    -- and the job's (the kill switch's at once); every attempt after sends
    -- these very bytes. Building it here, off the transition, halved what
    -- webhooks cost a transition when measured.
    body        json,
    -- pending: due at next_at; sending: claimed by a deliverer until next_at
    -- (then claimable again: at-least-once); delivered and dead are final
    -- until a redelivery; dropped: its subscription was deleted first.
    state       text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sending', 'delivered', 'dead', 'dropped')),
    attempts    integer     NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL DEFAULT now(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    last_status integer,
    last_error  text
);
-- Due rows in claim order. With `id` in the key the claim reads them in
-- order and stops at its limit: the rows of one transaction share their
-- next_at, and on (next_at) alone every claim sorted a whole backlog.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_at, id)
    WHERE state IN ('pending', 'sending');
-- The rows of one stream, for the claim's ordering check, and a job's rows
-- for GET /v1/jobs/{id}/deliveries.
CREATE INDEX webhook_deliveries_stream_idx ON webhook_deliveries (job_id, webhook_id, id);

-- Every attempt: when, how long, what status came back (NULL: none), and at
-- most 1 KiB of the answer.
CREATE TABLE webhook_attempts (
    delivery_id bigint      NOT NULL,
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    duration_ms integer     NOT NULL,
    status      integer,
    error       text,
    response    text        CHECK (octet_length(response) <= 1024),
    PRIMARY KEY (delivery_id, attempt)
);

-- A job event the webhooks report becomes one outbox row per URL: the job's
-- callback_url, then each matching subscription. A statement-level trigger
-- with a transition table, so a batch of 2,000 transitions costs one insert,
-- and so that every writer of job_events (claims, batched finishes,
-- cancels, the reaper, progress) is covered without being told. It runs
-- after the statement, so it sees the job rows as the statement left them.
-- No statement writes two reported events of one job, so the rows need no
-- order here; a stream's order is the order of its statements. An expired
-- lease (the reaper's `lease_expired`) is reported as what it led to: a
-- retry (`failed`) or `dead`.
-- Subscriptions are read without a lock: a row written for one deleted
-- meanwhile is skipped by the claim and dropped by the deliverers.
CREATE FUNCTION job_events_to_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, webhook_id, event, url, event_id, status, version)
    SELECT e.job_id, t.webhook_id, r.type, t.url, e.id, j.status, j.version
    FROM new_events e
    JOIN jobs j ON j.id = e.job_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN e.type <> 'lease_expired' THEN e.type
                    WHEN j.status = 'dead' THEN 'dead' ELSE 'failed' END AS type
    ) r
    CROSS JOIN LATERAL (
        SELECT '00000000-0000-0000-0000-000000000000'::uuid AS webhook_id, j.callback_url AS url
        WHERE j.callback_url IS NOT NULL
        UNION ALL
        SELECT w.id, w.url
        FROM webhooks w
        WHERE r.type = ANY (w.events)
          AND (w.queues IS NULL OR j.queue = ANY (w.queues))
          AND (w.kinds IS NULL OR j.kind = ANY (w.kinds))
    ) t
    WHERE r.type IN ('started', 'progress', 'succeeded', 'failed', 'dead', 'cancelled');
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_events_webhooks AFTER INSERT ON job_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION job_events_to_webhooks();

-- The kill switch's engagements and lifts, to the subscriptions that ask.
-- A record the Valkey outbox writes late is reported when it is written.
CREATE FUNCTION control_events_to_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, webhook_id, event, url, body)
    SELECT '00000000-0000-0000-0000-000000000000'::uuid, w.id, k.event, w.url,
        json_build_object(
            'type', 'killswitch.' || k.event,
            'timestamp', c.at,
            'data', json_build_object('id', c.id, 'actor', c.actor, 'reason', c.reason))
    FROM new_events c
    CROSS JOIN LATERAL (
        SELECT CASE c.type WHEN 'kill_all' THEN 'engaged' ELSE 'lifted' END AS event
    ) k
    JOIN webhooks w ON k.event = ANY (w.events)
    ORDER BY c.at, c.id, w.id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER control_events_webhooks AFTER INSERT ON control_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION control_events_to_webhooks();
