-- engageKillSwitch: record that everything is to stop, and tell every worker.
--
-- Guarantees: the first engagement is kept (who, why, since when) until the
-- switch is lifted; engaging it again sends the signal again and changes
-- nothing else. Durable: workers that miss the message read the hash on
-- their next heartbeat.
--
-- KEYS[1] kill switch hash
-- ARGV[1] control channel
-- ARGV[2] control event id
-- ARGV[3] since (Unix ms)
-- ARGV[4] actor
-- ARGV[5] reason
--
-- Returns the engagement in force, as {field, value, …}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'id', ARGV[2], 'since_ms', ARGV[3], 'actor', ARGV[4], 'reason', ARGV[5])
end
redis.call('PUBLISH', ARGV[1], 'engaged')
return redis.call('HGETALL', KEYS[1])
