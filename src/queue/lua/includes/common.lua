-- Shared helpers, prepended to the scripts that need them at build time.

-- Milliseconds from the server's clock, so every worker agrees on "now".
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Pending score: lower pops first. Priority 10 sorts before 1; within a
-- priority the per-queue sequence keeps FIFO order. Exact below 2^53.
local function pending_score(priority, seq_key)
  return (10 - priority) * 10000000000000 + redis.call('INCR', seq_key)
end

-- Moves up to `limit` due ids from the delayed set to the pending set, oldest
-- due time first. Returns how many moved.
local function promote_due(delayed_key, pending_key, prio_key, seq_key, now, limit)
  local due = redis.call('ZRANGEBYSCORE', delayed_key, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local p = tonumber(redis.call('HGET', prio_key, id) or '5')
    redis.call('ZADD', pending_key, pending_score(p, seq_key), id)
  end
  if #due > 0 then
    redis.call('ZREM', delayed_key, unpack(due))
  end
  return #due
end
