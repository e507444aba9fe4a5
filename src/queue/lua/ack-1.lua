-- ack: release the leases of finished jobs.
--
-- Guarantees: called only after the Postgres transition committed. The hot
-- path of every job, so it only touches the active set; `forget` clears
-- every trace of an id.
--
-- KEYS[1] active
-- ARGV[1..] ids
--
-- Returns the number of ids that were active.
if #ARGV == 0 then
  return 0
end
return redis.call('ZREM', KEYS[1], unpack(ARGV))
