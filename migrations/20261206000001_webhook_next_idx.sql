-- no-transaction
-- Due outbox rows by next_at alone. The index it replaces, (next_at, id),
-- also matched a lookup by id (its second column) under the same partial
-- predicate, and the planner took it for the deliverers' updates by id
-- whenever its statistics made the index look small: each outcome then
-- scanned the whole due index (460 pages an outcome at a 30,000-row
-- backlog, measured with auto_explain). Claims order by next_at alone, so
-- this index serves them without a sort, and lookups by id go to the
-- primary key. Built CONCURRENTLY (hence one statement, outside a
-- transaction) so a large outbox keeps taking writes meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_next_idx
    ON webhook_deliveries (next_at) WHERE state IN ('pending', 'sending');
