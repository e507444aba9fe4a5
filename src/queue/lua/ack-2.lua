-- ack: release the leases of finished jobs.
--
-- Guarantees: called only after the Postgres transition committed. The hot
-- path of every job, so it only touches the active set and the ids'
-- concurrency keys; `forget` clears every trace of an id.
--
-- KEYS[1] active  KEYS[2] ckey
-- ARGV[1] the queue's key base, for the per-tag running sets
-- ARGV[2..] ids
--
-- Returns the number of ids that were active.
if #ARGV < 2 then
  return 0
end
local ids = {}
for i = 2, #ARGV do
  ids[#ids + 1] = ARGV[i]
end
local cks = redis.call('HMGET', KEYS[2], unpack(ids))
local keyed = false
for i, ck in ipairs(cks) do
  local tab = ck and string.find(ck, '\t', 1, true)
  if tab then
    redis.call('ZREM', ARGV[1] .. 'ck:' .. string.sub(ck, tab + 1), ids[i])
  end
  keyed = keyed or ck
end
if keyed then
  redis.call('HDEL', KEYS[2], unpack(ids))
end
return redis.call('ZREM', KEYS[1], unpack(ids))
