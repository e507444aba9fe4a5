-- restoreRunning: after Valkey lost its data, put back the running jobs
-- that have a concurrency key, before any waiting job is indexed again,
-- so a key at its limit stays at its limit.
--
-- KEYS[1] active  KEYS[2] ckey
-- ARGV[1] the queue's key base, for the per-tag running sets
-- ARGV[2..] quadruples: id, lease deadline (ms), limit, tag. An id whose
-- lease ran out gets its key only: the reaper retries it, with its key.
--
-- Returns the number of ids restored.
local now = now_ms()
local n = 0
for i = 2, #ARGV, 4 do
  local id, deadline, limit, tag = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  redis.call('HSET', KEYS[2], id, limit .. '\t' .. tag)
  if tonumber(deadline) > now then
    if not redis.call('ZSCORE', KEYS[1], id) then
      redis.call('ZADD', KEYS[1], deadline, id)
    end
    redis.call('ZADD', ARGV[1] .. 'ck:' .. tag, now, id)
  end
  n = n + 1
end
return n
