-- ack: release the leases of finished jobs.
--
-- Guarantees: called only after the Postgres transition committed. The hot
-- path of every job, so it only touches the active set and the ids'
-- concurrency keys (their per-key running sets drop them when next
-- counted); `forget` clears every trace of an id.
--
-- KEYS[1] active  KEYS[2] ckey
-- ARGV[1..] ids
--
-- Returns the number of ids that were active.
if #ARGV == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], unpack(ARGV))
return redis.call('ZREM', KEYS[1], unpack(ARGV))
