-- forget: remove every trace of ids whose job is finished, cancelled or
-- unknown to Postgres (index repair, stale duplicates).
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio
-- KEYS[5] ckey     KEYS[6] held
-- ARGV[1] the queue's key base, for the per-tag held sets
-- ARGV[2..] ids
--
-- Returns the number of ids that were indexed anywhere.
if #ARGV < 2 then
  return 0
end
local ids = {}
for i = 2, #ARGV do
  ids[#ids + 1] = ARGV[i]
end
local n = redis.call('ZREM', KEYS[1], unpack(ids))
n = n + redis.call('ZREM', KEYS[2], unpack(ids))
n = n + redis.call('ZREM', KEYS[3], unpack(ids))
redis.call('HDEL', KEYS[4], unpack(ids))
local cks = redis.call('HMGET', KEYS[5], unpack(ids))
for i, ck in ipairs(cks) do
  local tab = ck and string.find(ck, '\t', 1, true)
  if tab then
    local tag = string.sub(ck, tab + 1)
    redis.call('ZREM', ARGV[1] .. 'held:' .. tag, ids[i])
    redis.call('ZREM', ARGV[1] .. 'ck:' .. tag, ids[i])
  end
end
n = n + redis.call('ZREM', KEYS[6], unpack(ids))
redis.call('HDEL', KEYS[5], unpack(ids))
return n
