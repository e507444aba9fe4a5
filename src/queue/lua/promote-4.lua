-- promote: move delayed jobs whose due time has come to pending.
--
-- Guarantees: atomic and idempotent, so every replica may run it at once.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] prio  KEYS[4] seq
-- ARGV[1] wake channel
-- ARGV[2] maximum ids to promote
--
-- Returns the number promoted.
local n = promote_due(KEYS[2], KEYS[1], KEYS[3], KEYS[4], now_ms(), tonumber(ARGV[2]))
if n > 0 then
  redis.call('PUBLISH', ARGV[1], n)
end
return n
