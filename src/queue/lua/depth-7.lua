-- depth: a snapshot of one queue.
--
-- Read-only.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] paused flag
-- KEYS[5] halted flag  KEYS[6] held
-- KEYS[7] rate-wait flag: set by a claim the queue's rate limit refused,
--         until its bucket has a token again
--
-- Returns {delayed, active, paused, halted, held, rate-wait,
-- pending at priority 1..10}.
local out = {
  redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
  redis.call('EXISTS', KEYS[4]),
  redis.call('EXISTS', KEYS[5]),
  redis.call('ZCARD', KEYS[6]),
  redis.call('EXISTS', KEYS[7]),
}
for p = 1, 10 do
  local lo = (10 - p) * 10000000000000
  out[#out + 1] = redis.call('ZCOUNT', KEYS[1], lo, '(' .. (lo + 10000000000000))
end
return out
