-- enqueue: index new (or re-indexed) jobs, one or many at once.
--
-- Guarantees: an id already indexed anywhere in the queue (pending, delayed or
-- active) is left alone, so the reconciler may call this with ids it is not
-- sure about. Due jobs go to pending by priority then FIFO; future ones to
-- delayed. Subscribers are woken when something became pending.
--
-- KEYS[1] pending  zset  id -> priority/sequence score
-- KEYS[2] delayed  zset  id -> due time (ms)
-- KEYS[3] active   zset  id -> lease deadline (ms)
-- KEYS[4] prio     hash  id -> priority
-- KEYS[5] seq      string counter
-- ARGV[1] wake channel
-- ARGV[2..] triples: id, priority (1..10), due time in ms (0 = now)
--
-- Returns the number of ids indexed.
local now = now_ms()
local added, ready = 0, 0
for i = 2, #ARGV, 3 do
  local id, p, due = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if not redis.call('ZSCORE', KEYS[3], id)
      and not redis.call('ZSCORE', KEYS[1], id)
      and not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('HSET', KEYS[4], id, p)
    if due > now then
      redis.call('ZADD', KEYS[2], due, id)
    else
      redis.call('ZADD', KEYS[1], pending_score(p, KEYS[5]), id)
      ready = ready + 1
    end
    added = added + 1
  end
end
if ready > 0 then
  redis.call('PUBLISH', ARGV[1], ready)
end
return added
