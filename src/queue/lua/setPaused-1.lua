-- setPaused: pause (ARGV[1] = 1) or resume (ARGV[1] = 0) a queue.
--
-- Guarantees: a paused queue hands out no ids; jobs keep waiting, nothing is
-- dropped, running jobs are not touched. Resuming wakes the workers.
--
-- KEYS[1] paused flag
-- ARGV[1] 1 to pause, 0 to resume
-- ARGV[2] wake channel
--
-- Returns 1 if the state changed, 0 if it already was so.
if ARGV[1] == '1' then
  return redis.call('SETNX', KEYS[1], '1')
end
local changed = redis.call('DEL', KEYS[1])
if changed == 1 then
  redis.call('PUBLISH', ARGV[2], 0)
end
return changed
