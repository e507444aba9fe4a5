-- Every write to a job row increments its version (optimistic concurrency:
-- progress writes, and ETags later). A trigger, so no statement can forget.
-- It changes no indexed column, so claims stay HOT updates.
ALTER TABLE jobs ADD COLUMN version bigint NOT NULL DEFAULT 0;

-- What the job's agent last reported: {"percent", "message", "at"}.
ALTER TABLE jobs ADD COLUMN progress jsonb;

CREATE FUNCTION jobs_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_version BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_bump_version();
