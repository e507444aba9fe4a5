-- enqueue: index new (or re-indexed) jobs, one or many at once.
--
-- Guarantees: an id already indexed anywhere in the queue (pending, delayed,
-- active, or held by its concurrency key) is left alone, so the reconciler
-- may call this with ids it is not sure about. Due jobs go to pending by
-- priority then FIFO; future ones to delayed. Subscribers are woken when
-- something became pending.
--
-- KEYS[1] pending  zset  id -> priority/sequence score
-- KEYS[2] delayed  zset  id -> due time (ms)
-- KEYS[3] active   zset  id -> lease deadline (ms)
-- KEYS[4] prio     hash  id -> priority, for delayed ids
-- KEYS[5] seq      string counter
-- KEYS[6] held     zset  id -> pending score, ids whose key is at its limit
-- ARGV[1] wake channel
-- ARGV[2..] triples: id, priority (1..10), due time in ms (0 = now)
--
-- Returns the number of ids indexed.
local entries = {}
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], id)
      and not redis.call('ZSCORE', KEYS[3], id)
      and not redis.call('ZSCORE', KEYS[2], id)
      and not redis.call('ZSCORE', KEYS[6], id) then
    entries[#entries + 1] = id
    entries[#entries + 1] = ARGV[i + 1]
    entries[#entries + 1] = ARGV[i + 2]
  end
end
place(KEYS[1], KEYS[2], KEYS[4], KEYS[5], now_ms(), entries, ARGV[1])
return #entries / 3
