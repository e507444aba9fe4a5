-- claim: hand out up to N ids under a lease, highest priority first, FIFO
-- within a priority, after promoting delayed jobs that are due, and within
-- the concurrency limits of their keys.
--
-- Guarantees: atomic; two workers never receive the same id from one pending
-- entry. The lease deadline is recorded in the active set. Postgres still
-- decides: the caller's claim transaction may refuse an id (cancelled, not
-- yet due by Postgres' clock), and then gives it back or drops it.
--
-- Concurrency keys: an id with an entry in the ckey hash ("<limit>\t<tag>")
-- runs only while fewer than <limit> ids of its tag run. The ids of a tag
-- that run are the members of `<base>ck:<tag>` still in the active set
-- (others are stale: acked, reaped, forgotten, and are dropped when seen).
-- An id whose key is full is held, with its pending score, in `held` and
-- `<base>held:<tag>`, so the ids behind it with other keys keep flowing,
-- and goes back to pending (at its old place) when its key has room: it is
-- skipped, never starved.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio
-- KEYS[5] seq      KEYS[6] paused flag
-- KEYS[7] limit: most ids under a lease at once, across every worker
--         (absent: no limit)
-- KEYS[8] halted flag: present while the kill switch is engaged
-- KEYS[9] ckey hash  KEYS[10] held zset  KEYS[11] heldkeys hash (tag -> limit)
-- KEYS[12] the queue's token bucket (hash: tokens, ts)
-- ARGV[1] lease length (ms)
-- ARGV[2] maximum ids to claim
-- ARGV[3] maximum delayed ids to promote first
-- ARGV[4] the queue's key base (`<prefix>:{q:<name>}:`), for the per-tag keys
-- ARGV[5] the queue's rate limit, `<starts>:<window ms>`, or empty
-- ARGV[6] each key's rate limit, the same way (`<base>bucket:<tag>`)
--
-- Rate limits are token buckets: <starts> tokens, refilled evenly over the
-- window; each start takes one. Over the limit, ids wait (the queue's in
-- pending, a key's held like a full key); nothing fails.
--
-- Returns pairs {id, priority, …}, -1 (PAUSED) when the queue is paused
-- or halted, or -2 (RATE_LIMITED) when its bucket holds no token while ids
-- wait.
if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[8]) == 1 then
  return -1
end
local now = now_ms()
local base = ARGV[4]

local function rate(spec)
  if spec == nil or spec == '' then
    return nil
  end
  local colon = string.find(spec, ':', 1, true)
  return { n = tonumber(string.sub(spec, 1, colon - 1)), ms = tonumber(string.sub(spec, colon + 1)) }
end
local queue_rate, key_rate = rate(ARGV[5]), rate(ARGV[6])

-- Tokens in a bucket now (refilled since it was last written).
local function level(key, r)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if not tokens then
    return r.n
  end
  return math.min(r.n, tokens + math.max(0, now - ts) * r.n / r.ms)
end
local function store(key, r, tokens)
  redis.call('HSET', key, 'tokens', tokens, 'ts', now)
  redis.call('PEXPIRE', key, r.ms * 2 + 1000)
end
-- Per-key buckets touched by this call: tag -> tokens.
local key_tokens = {}
local function key_level(tag)
  local t = key_tokens[tag]
  if t == nil then
    t = level(base .. 'bucket:' .. tag, key_rate)
    key_tokens[tag] = t
  end
  return t
end
promote_due(KEYS[2], KEYS[1], KEYS[4], KEYS[5], now, tonumber(ARGV[3]))

-- Running ids per tag, counted once per call and kept up to date here.
local running = {}
local function count(tag)
  local c = running[tag]
  if c then
    return c
  end
  c = 0
  local set = base .. 'ck:' .. tag
  for _, m in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    if redis.call('ZSCORE', KEYS[3], m) then
      c = c + 1
    else
      redis.call('ZREM', set, m)
    end
  end
  running[tag] = c
  return c
end

-- Held ids whose key has room go back to pending first.
local held = redis.call('HGETALL', KEYS[11])
for i = 1, #held, 2 do
  local tag, limit = held[i], tonumber(held[i + 1])
  local room = limit - count(tag)
  if key_rate then
    room = math.min(room, math.floor(key_level(tag)))
  end
  local tagged = base .. 'held:' .. tag
  if room > 0 then
    local back = redis.call('ZPOPMIN', tagged, room)
    for j = 1, #back, 2 do
      redis.call('ZADD', KEYS[1], back[j + 1], back[j])
      redis.call('ZREM', KEYS[10], back[j])
    end
  end
  if redis.call('EXISTS', tagged) == 0 then
    redis.call('HDEL', KEYS[11], tag)
  end
end

local want = tonumber(ARGV[2])
local limit = tonumber(redis.call('GET', KEYS[7]) or '')
if limit then
  want = math.min(want, limit - redis.call('ZCARD', KEYS[3]))
  if want <= 0 then
    return {}
  end
end
local queue_tokens
if queue_rate then
  queue_tokens = level(KEYS[12], queue_rate)
  want = math.min(want, math.floor(queue_tokens))
  if want <= 0 then
    if redis.call('ZCARD', KEYS[1]) > 0 then
      -- Says, until the bucket has a token again, that the pending ids
      -- wait for it (the depth script reports them as rate_limited).
      local wait = math.ceil((1 - queue_tokens) * queue_rate.ms / queue_rate.n)
      redis.call('SET', base .. 'ratewait', '1', 'PX', math.max(1, wait))
      return -2
    end
    return {}
  end
end
-- Past the queue's limit (or it has none now): nothing waits for it.
redis.call('DEL', base .. 'ratewait')
local deadline = now + tonumber(ARGV[1])
local out, active = {}, {}
-- Held ids cost a look each; bound the looks of one call.
local looks = want * 4 + 100
while #out / 2 < want and looks > 0 do
  local popped = redis.call('ZPOPMIN', KEYS[1], math.min(want - #out / 2, looks))
  if #popped == 0 then
    break
  end
  for i = 1, #popped, 2 do
    local id, score = popped[i], popped[i + 1]
    looks = looks - 1
    local take = true
    local ck = redis.call('HGET', KEYS[9], id)
    local tab = ck and string.find(ck, '\t', 1, true)
    local key_limit = tab and tonumber(string.sub(ck, 1, tab - 1))
    if ck and not key_limit then
      -- Not written by set_concurrency: dropped rather than let it stop
      -- the queue (the reconciler writes it again from Postgres).
      redis.call('HDEL', KEYS[9], id)
    end
    if key_limit then
      local tag = string.sub(ck, tab + 1)
      if count(tag) >= key_limit or (key_rate and key_level(tag) < 1) then
        take = false
        redis.call('ZADD', base .. 'held:' .. tag, score, id)
        redis.call('ZADD', KEYS[10], score, id)
        redis.call('HSET', KEYS[11], tag, key_limit)
      else
        running[tag] = running[tag] + 1
        redis.call('ZADD', base .. 'ck:' .. tag, now, id)
        if key_rate then
          key_tokens[tag] = key_level(tag) - 1
        end
      end
    end
    if take then
      out[#out + 1] = id
      out[#out + 1] = score_priority(score)
      active[#active + 1] = deadline
      active[#active + 1] = id
    end
  end
end
if #active > 0 then
  redis.call('ZADD', KEYS[3], unpack(active))
end
if queue_rate then
  store(KEYS[12], queue_rate, queue_tokens - #active / 2)
end
for tag, tokens in pairs(key_tokens) do
  store(base .. 'bucket:' .. tag, key_rate, tokens)
end
return out
