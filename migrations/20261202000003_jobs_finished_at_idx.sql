-- no-transaction
-- The dashboard's throughput (what finished in the last minutes, by queue),
-- and later retention, read jobs by finished_at. A partial index written
-- once per finished job; built CONCURRENTLY so a large table keeps taking
-- writes meanwhile (hence one statement, outside a transaction).
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_finished_at_idx
    ON jobs (finished_at) WHERE finished_at IS NOT NULL;
