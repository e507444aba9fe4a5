-- no-transaction
-- The (next_at, id) index that webhook_deliveries_next_idx replaces.
DROP INDEX CONCURRENTLY IF EXISTS webhook_deliveries_due_idx;
