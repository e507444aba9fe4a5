-- reindex: move edited jobs to their new place (priority, due time), but
-- only those still waiting. An id a worker has already claimed (active) or
-- that is not indexed at all is left alone: Postgres decided the edit
-- before or after the claim, and the reconciler indexes what is missing.
--
-- KEYS[1] pending  zset  id -> priority/sequence score
-- KEYS[2] delayed  zset  id -> due time (ms)
-- KEYS[3] active   zset  id -> lease deadline (ms)
-- KEYS[4] prio     hash  id -> priority, for delayed ids
-- KEYS[5] seq      string counter
-- ARGV[1] wake channel
-- ARGV[2..] triples: id, priority (1..10), due time in ms (0 = now)
--
-- Returns the number of ids moved. A moved id goes behind the ids already
-- waiting at its new priority.
local entries = {}
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[3], id) then
    local removed = redis.call('ZREM', KEYS[1], id) + redis.call('ZREM', KEYS[2], id)
    if removed > 0 then
      redis.call('HDEL', KEYS[4], id)
      entries[#entries + 1] = id
      entries[#entries + 1] = ARGV[i + 1]
      entries[#entries + 1] = ARGV[i + 2]
    end
  end
end
place(KEYS[1], KEYS[2], KEYS[4], KEYS[5], now_ms(), entries, ARGV[1])
return #entries / 3
