-- Control events: kill switch engagements and lifts, the deployment-wide
-- part of the audit trail (each job's part is in job_events). The id is made
-- by whoever engaged the switch, before Postgres is asked: a record kept in
-- the Valkey outbox while Postgres was down is written once, however often
-- it is retried. `at` is when it happened, not when it was written.
CREATE TABLE control_events (
    id      uuid        PRIMARY KEY,
    at      timestamptz NOT NULL,
    type    text        NOT NULL CHECK (type IN ('kill_all', 'resume')),
    actor   text        NOT NULL,
    reason  text        NOT NULL,
    data    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    written_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX control_events_at_idx ON control_events (at);

CREATE FUNCTION control_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'control_events is append-only';
END;
$$;
CREATE TRIGGER control_events_no_change BEFORE UPDATE OR DELETE ON control_events
    FOR EACH ROW EXECUTE FUNCTION control_events_append_only();
