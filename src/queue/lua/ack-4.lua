-- ack: forget ids whose job is finished (or unknown to Postgres).
--
-- Guarantees: called only after the Postgres transition committed; removes
-- every trace of the ids from the queue, including stale duplicates.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio
-- ARGV[1..] ids
--
-- Returns the number of ids that were active.
if #ARGV == 0 then
  return 0
end
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('ZREM', KEYS[2], unpack(ARGV))
redis.call('HDEL', KEYS[4], unpack(ARGV))
return redis.call('ZREM', KEYS[3], unpack(ARGV))
