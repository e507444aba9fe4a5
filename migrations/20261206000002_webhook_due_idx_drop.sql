-- The (next_at, id) index that webhook_deliveries_next_idx replaces, dropped
-- only once the new one is valid. A CREATE INDEX CONCURRENTLY that was
-- interrupted (a cancel, or a deadlock with a second migrator waiting on
-- its lock) leaves an invalid index that IF NOT EXISTS then skips; here it
-- is built again, in this transaction (holding writes to the outbox while
-- it builds: only on that rare path), so the outbox is never left without
-- a usable due index. The old index is dropped in this transaction too,
-- waiting at most 10 s for its lock (else the migration fails and is run
-- again).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relname = 'webhook_deliveries_next_idx' AND i.indisvalid
    ) THEN
        DROP INDEX IF EXISTS webhook_deliveries_next_idx;
        CREATE INDEX webhook_deliveries_next_idx
            ON webhook_deliveries (next_at) WHERE state IN ('pending', 'sending');
    END IF;
END;
$$;
SET LOCAL lock_timeout = '10s';
DROP INDEX IF EXISTS webhook_deliveries_due_idx;
