-- claim: hand out up to N ids under a lease, highest priority first, FIFO
-- within a priority, after promoting delayed jobs that are due.
--
-- Guarantees: atomic; two workers never receive the same id from one pending
-- entry. The lease deadline is recorded in the active set. Postgres still
-- decides: the caller's claim transaction may refuse an id (cancelled, not
-- yet due by Postgres' clock), and then gives it back or drops it.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio
-- KEYS[5] seq      KEYS[6] paused flag
-- KEYS[7] limit: most ids under a lease at once, across every worker
--         (absent: no limit)
-- KEYS[8] halted flag: present while the kill switch is engaged
-- ARGV[1] lease length (ms)
-- ARGV[2] maximum ids to claim
-- ARGV[3] maximum delayed ids to promote first
--
-- Returns pairs {id, priority, …}, or -1 (PAUSED) when the queue is paused
-- or halted.
if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[8]) == 1 then
  return -1
end
local now = now_ms()
promote_due(KEYS[2], KEYS[1], KEYS[4], KEYS[5], now, tonumber(ARGV[3]))
local want = tonumber(ARGV[2])
local limit = tonumber(redis.call('GET', KEYS[7]) or '')
if limit then
  want = math.min(want, limit - redis.call('ZCARD', KEYS[3]))
  if want <= 0 then
    return {}
  end
end
local popped = redis.call('ZPOPMIN', KEYS[1], want)
if #popped == 0 then
  return {}
end
local deadline = now + tonumber(ARGV[1])
local out, active = {}, {}
for i = 1, #popped, 2 do
  out[#out + 1] = popped[i]
  out[#out + 1] = score_priority(popped[i + 1])
  active[#active + 1] = deadline
  active[#active + 1] = popped[i]
end
redis.call('ZADD', KEYS[3], unpack(active))
return out
