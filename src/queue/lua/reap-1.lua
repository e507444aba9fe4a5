-- reap: find leases whose deadline has passed.
--
-- Guarantees: each expired id is handed to one reaper at a time: its deadline
-- is pushed forward by a hold period, so reapers in other replicas skip it
-- while this one asks Postgres (the truth) what to do with it.
--
-- KEYS[1] active
-- ARGV[1] maximum ids
-- ARGV[2] hold period (ms)
--
-- Returns the expired ids.
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local hold = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], hold, id)
end
return ids
