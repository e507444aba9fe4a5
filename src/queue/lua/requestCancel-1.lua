-- requestCancel: ask whichever worker runs a job to stop it.
--
-- Guarantees: durable for a day (the flag), and immediate for workers that
-- listen (the message); a worker that missed the message finds the flag on
-- its next heartbeat.
--
-- KEYS[1] the job's cancel flag
-- ARGV[1] cancel channel
-- ARGV[2] job id
-- ARGV[3] "requested_ms<TAB>actor<TAB>reason"
-- ARGV[4] flag lifetime (seconds)
--
-- Returns 1.
redis.call('SET', KEYS[1], ARGV[3], 'EX', tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
