-- Producers' own labels on a job (a JSON object, at most 8 KiB), editable
-- with PATCH /v1/jobs/{id} until the job starts. A constant default makes
-- this a catalogue-only change on PostgreSQL 11+: no table rewrite.
ALTER TABLE jobs ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'::jsonb;
