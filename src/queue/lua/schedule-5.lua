-- schedule: move active jobs back to waiting: retries after backoff, leases
-- returned by the reaper, work released at shutdown.
--
-- Guarantees: called only after Postgres recorded the new status and due
-- time. Due ids become pending (by priority, then FIFO), others delayed.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio  KEYS[5] seq
-- ARGV[1] wake channel
-- ARGV[2..] triples: id, priority (0 = keep the indexed one), due time in ms (0 = now)
--
-- Returns the number of ids that became pending right away.
local now = now_ms()
local ready = 0
for i = 2, #ARGV, 3 do
  local id, p, due = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if p == 0 then
    p = tonumber(redis.call('HGET', KEYS[4], id) or '5')
  end
  redis.call('ZREM', KEYS[3], id)
  redis.call('HSET', KEYS[4], id, p)
  if due > now then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], due, id)
  else
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], pending_score(p, KEYS[5]), id)
    ready = ready + 1
  end
end
if ready > 0 then
  redis.call('PUBLISH', ARGV[1], ready)
end
return ready
