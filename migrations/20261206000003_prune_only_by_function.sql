-- The trail's guard asks who deletes, not what the session says. Before,
-- prune_finished_jobs() set `orchestrator.pruning` for its DELETE and the
-- guard believed the setting, which any session can set too. Now the guard
-- reads the call stack (GET DIAGNOSTICS PG_CONTEXT): a DELETE passes only
-- when it is the very statement of prune_finished_jobs() below, whatever
-- a session has set. TRUNCATE never passes. (A role of its own for the
-- pruning would be stronger still, but migrations cannot assume the right
-- to create roles.) The lines are matched by what the server does not
-- translate (lc_messages may be another language): the statement's exact
-- text at the end of its line, and the function's signature, with or
-- without a schema. This stops any code path and any mistaken statement;
-- someone who may create functions or drop triggers is not stopped.
CREATE OR REPLACE FUNCTION job_events_prune_only() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    context text;
    stack text[];
BEGIN
    IF TG_OP = 'DELETE' THEN
        GET DIAGNOSTICS context = PG_CONTEXT;
        stack := string_to_array(context, E'\n');
        IF stack[2] ~ ' .DELETE FROM job_events WHERE job_id = ANY\(doomed\).$'
           AND stack[3] ~ '^PL/pgSQL[^ ]* ([^ ]+ )?([a-z_]+\.)?prune_finished_jobs\(text,timestamp with time zone,integer,text\) '
        THEN
            RETURN NULL;
        END IF;
    END IF;
    RAISE EXCEPTION 'job_events is append-only; only prune_finished_jobs() deletes from it';
END;
$$;

-- As before (up to `batch` finished jobs of one status that finished
-- before `cutoff`, oldest first, with their events and webhook rows; rows
-- another transaction holds are skipped), and of one queue when `queue`
-- is given (the bench's throwaway queues). No setting any more: the guard
-- knows this function by its stack.
DROP FUNCTION IF EXISTS prune_finished_jobs(text, timestamptz, integer);
CREATE OR REPLACE FUNCTION prune_finished_jobs(p_status text, p_cutoff timestamptz, p_batch integer,
                                    p_queue text DEFAULT NULL)
RETURNS TABLE (pruned_jobs bigint, pruned_events bigint) LANGUAGE plpgsql AS $$
DECLARE
    doomed uuid[];
BEGIN
    SELECT array_agg(id) INTO doomed FROM (
        SELECT id FROM jobs
        WHERE finished_at IS NOT NULL AND finished_at < p_cutoff AND status = p_status
          AND (p_queue IS NULL OR queue = p_queue)
        ORDER BY finished_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ) AS d;
    IF doomed IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    DELETE FROM job_events WHERE job_id = ANY(doomed);
    GET DIAGNOSTICS pruned_events = ROW_COUNT;
    DELETE FROM webhook_attempts WHERE delivery_id IN
        (SELECT id FROM webhook_deliveries WHERE job_id = ANY(doomed));
    DELETE FROM webhook_deliveries WHERE job_id = ANY(doomed);
    DELETE FROM jobs WHERE id = ANY(doomed);
    GET DIAGNOSTICS pruned_jobs = ROW_COUNT;
    RETURN NEXT;
END;
$$;
