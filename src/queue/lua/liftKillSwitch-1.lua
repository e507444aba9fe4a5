-- liftKillSwitch: end an engagement of the kill switch and tell every worker.
--
-- Guarantees: idempotent; the queues' halted flags are cleared by the
-- caller afterwards (each is its own slot), and workers treat a lifted
-- switch as lifted even before that.
--
-- KEYS[1] kill switch hash
-- ARGV[1] control channel
--
-- Returns the engagement that was lifted, as {field, value, …}; empty if
-- the switch was not engaged.
local state = redis.call('HGETALL', KEYS[1])
if #state > 0 then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[1], 'lifted')
return state
