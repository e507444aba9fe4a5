-- missing: which of the given ids the queue does not index at all.
--
-- Read-only. The reconciler asks this first, then re-reads only the missing
-- ids from Postgres before indexing them, so a job that finished while the
-- reconciler was reading is not indexed again from a stale read.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] held
-- ARGV[1..] ids
--
-- Returns the ids found in none of the four sets.
local out = {}
for _, id in ipairs(ARGV) do
  if not redis.call('ZSCORE', KEYS[1], id)
      and not redis.call('ZSCORE', KEYS[3], id)
      and not redis.call('ZSCORE', KEYS[2], id)
      and not redis.call('ZSCORE', KEYS[4], id) then
    out[#out + 1] = id
  end
end
return out
