-- Shared helpers, prepended to the scripts that need them at build time.

-- Milliseconds from the server's clock, so every worker agrees on "now".
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Pending scores: lower pops first. Priority 10 sorts before 1; within a
-- priority the per-queue sequence keeps FIFO order. Exact below 2^53.
local PRIORITY_STEP = 10000000000000

local function pending_score(priority, seq)
  return (10 - priority) * PRIORITY_STEP + seq
end

-- The priority a pending score encodes.
local function score_priority(score)
  return 10 - math.floor(tonumber(score) / PRIORITY_STEP)
end

-- Moves up to `limit` due ids from the delayed set to the pending set, oldest
-- due time first, with the priority kept for them in the prio hash.
-- Returns how many moved.
local function promote_due(delayed_key, pending_key, prio_key, seq_key, now, limit)
  local due = redis.call('ZRANGEBYSCORE', delayed_key, '-inf', now, 'LIMIT', 0, limit)
  if #due == 0 then
    return 0
  end
  local prios = redis.call('HMGET', prio_key, unpack(due))
  local seq = redis.call('INCRBY', seq_key, #due) - #due
  local args = {}
  for i, id in ipairs(due) do
    args[#args + 1] = pending_score(tonumber(prios[i]) or 5, seq + i)
    args[#args + 1] = id
  end
  redis.call('ZADD', pending_key, unpack(args))
  redis.call('ZREM', delayed_key, unpack(due))
  redis.call('HDEL', prio_key, unpack(due))
  return #due
end

-- Puts ids back to waiting: due ones pending (new FIFO position), others
-- delayed with their priority kept aside. `entries` holds triples
-- (id, priority, due ms). Publishes how many became pending on `wake`
-- (when any did) and returns it.
local function place(pending_key, delayed_key, prio_key, seq_key, now, entries, wake)
  local ready = {}
  for i = 1, #entries, 3 do
    local id, p, due = entries[i], tonumber(entries[i + 1]), tonumber(entries[i + 2])
    if due > now then
      redis.call('HSET', prio_key, id, p)
      redis.call('ZADD', delayed_key, due, id)
    else
      ready[#ready + 1] = p
      ready[#ready + 1] = id
    end
  end
  local n = #ready / 2
  if n > 0 then
    local seq = redis.call('INCRBY', seq_key, n) - n
    local args = {}
    for i = 1, #ready, 2 do
      seq = seq + 1
      args[#args + 1] = pending_score(ready[i], seq)
      args[#args + 1] = ready[i + 1]
    end
    redis.call('ZADD', pending_key, unpack(args))
    redis.call('PUBLISH', wake, n)
  end
  return n
end
