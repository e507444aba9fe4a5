-- schedule: move active jobs back to waiting: retries after backoff, leases
-- returned by the reaper, work released at shutdown.
--
-- Guarantees: called only after Postgres recorded the new status and due
-- time. Due ids become pending (by priority, then FIFO), others delayed.
--
-- KEYS[1] pending  KEYS[2] delayed  KEYS[3] active  KEYS[4] prio  KEYS[5] seq
-- ARGV[1] wake channel
-- ARGV[2..] triples: id, priority, due time in ms (0 = now)
--
-- Returns the number of ids that became pending right away.
local ids, entries = {}, {}
for i = 2, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  entries[#entries + 1] = ARGV[i]
  entries[#entries + 1] = ARGV[i + 1]
  entries[#entries + 1] = ARGV[i + 2]
end
if #ids == 0 then
  return 0
end
redis.call('ZREM', KEYS[3], unpack(ids))
-- An id moves wholly: out of whichever waiting set it may still be in.
redis.call('ZREM', KEYS[1], unpack(ids))
redis.call('ZREM', KEYS[2], unpack(ids))
return place(KEYS[1], KEYS[2], KEYS[4], KEYS[5], now_ms(), entries, ARGV[1])
