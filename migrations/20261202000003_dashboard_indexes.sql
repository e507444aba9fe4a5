-- The operators' dashboard reads two things often: what finished in the last
-- minutes (throughput by queue) and the last failed attempts. Both are small
-- partial indexes, so the hot path (claim, finish) pays almost nothing: the
-- first is written once per finished job, the second only for failures.
CREATE INDEX jobs_finished_at_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX job_events_failures_idx ON job_events (id) WHERE type IN ('failed', 'dead');
