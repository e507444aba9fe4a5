-- forget: remove every trace of ids whose job is finished, cancelled or
-- unknown to Postgres (index repair, stale duplicates).
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio
-- ARGV[1..] ids
--
-- Returns the number of ids that were indexed anywhere.
if #ARGV == 0 then
  return 0
end
local n = redis.call('ZREM', KEYS[1], unpack(ARGV))
n = n + redis.call('ZREM', KEYS[2], unpack(ARGV))
n = n + redis.call('ZREM', KEYS[3], unpack(ARGV))
redis.call('HDEL', KEYS[4], unpack(ARGV))
return n
