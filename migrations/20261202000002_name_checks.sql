-- Queue names and job kinds are validated before they are written
-- (QueueName, JobKind in src/job/mod.rs: an ASCII letter or digit, then
-- letters, digits, '.', '_' or '-', 64 at most). The database refuses
-- anything else too: the store decodes these names, and a row written
-- around the application would otherwise fail every batch it is in.
-- NOT VALID: rows already stored are not re-checked (they were written by
-- the application, validated).
ALTER TABLE jobs ADD CONSTRAINT jobs_queue_name
    CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$') NOT VALID;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_name
    CHECK (kind ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$') NOT VALID;
