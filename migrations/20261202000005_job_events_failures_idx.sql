-- no-transaction
-- The dashboard's last failed attempts: a partial index that only failures
-- write to, built CONCURRENTLY (one statement, outside a transaction).
CREATE INDEX CONCURRENTLY IF NOT EXISTS job_events_failures_idx
    ON job_events (id) WHERE type IN ('failed', 'dead');
