-- heartbeat: extend the leases of jobs a worker is running.
--
-- Guarantees: every given id ends up in the active set with the new deadline,
-- re-added if an index rebuild lost it (Postgres holds the real lease).
--
-- KEYS[1] active
-- ARGV[1] lease length (ms)
-- ARGV[2..] ids
--
-- Returns the number of ids refreshed.
if #ARGV < 2 then
  return 0
end
local deadline = now_ms() + tonumber(ARGV[1])
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = deadline
  args[#args + 1] = ARGV[i]
end
redis.call('ZADD', KEYS[1], unpack(args))
return #ARGV - 1
