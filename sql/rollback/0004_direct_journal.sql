-- Rollback of 0004_direct_journal: the staged journal for every writer again, and 0001's claim_jobs
-- and finish_and_claim (their text as 0001 created them). Nothing is lost: the events and counters
-- the direct path wrote are the same as the staged path writes.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0004_direct_journal.sql

DROP TRIGGER jobs_stage_updates ON reactor.jobs;
CREATE TRIGGER jobs_stage_updates AFTER UPDATE ON reactor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reactor.stage_updates();

CREATE OR REPLACE FUNCTION reactor.claim_jobs(p_reactor text, p_max integer, p_lease interval,
                                   p_clock timestamptz DEFAULT now())
RETURNS TABLE (id uuid, job_type text, priority text, payload jsonb, user_id uuid, renderer text,
               retry_count integer, max_retries integer, attempt integer, created_at timestamptz,
               input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql AS $$
DECLARE
    lim         record;
    run_total   integer;
    run_manim   integer;
    free_total  integer;
    free_manim  integer;
    timeout_min integer;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7240513002);
    -- the same rule as reactor.effective_limits(), inlined: plpgsql caches this plan
    SELECT c.max_concurrent_renders = 0 AS paused,
           CASE WHEN p.is_peak AND c.max_concurrent_renders > 0
                THEN greatest(1, floor(c.max_concurrent_renders * c.peak_worker_multiplier))::integer
                ELSE c.max_concurrent_renders END AS max_renders,
           CASE WHEN p.is_peak AND c.max_manim_renders > 0
                THEN greatest(1, floor(c.max_manim_renders * c.peak_worker_multiplier))::integer
                ELSE c.max_manim_renders END AS max_manim,
           c.job_timeout_minutes
      INTO lim
      FROM public.job_queue_config c,
           LATERAL (SELECT (p_clock AT TIME ZONE c.timezone)::time AS t) lt,
           LATERAL (SELECT coalesce(CASE
                WHEN c.peak_hour_start IS NULL OR c.peak_hour_start = c.peak_hour_end THEN false
                WHEN c.peak_hour_start < c.peak_hour_end
                    THEN lt.t >= c.peak_hour_start AND lt.t < c.peak_hour_end
                ELSE lt.t >= c.peak_hour_start OR lt.t < c.peak_hour_end
           END, false) AS is_peak) p;
    IF lim.paused THEN
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE j.renderer = 'manim')
      INTO run_total, run_manim
      FROM reactor.jobs j WHERE j.status = 'processing';
    free_total := least(lim.max_renders - run_total, p_max);
    IF free_total <= 0 THEN
        RETURN;
    END IF;
    free_manim := greatest(least(lim.max_manim - run_manim, free_total), 0);
    timeout_min := lim.job_timeout_minutes;
    RETURN QUERY
    WITH cand_manim AS (
        SELECT q.id, q.priority_rank, q.created_at, q.job_no FROM reactor.jobs q
         WHERE q.status = 'queued' AND q.renderer = 'manim' AND q.run_after <= now()
         ORDER BY q.priority_rank, q.created_at, q.job_no
         LIMIT free_manim FOR UPDATE SKIP LOCKED
    ), cand_other AS (
        SELECT q.id, q.priority_rank, q.created_at, q.job_no FROM reactor.jobs q
         WHERE q.status = 'queued' AND q.renderer <> 'manim' AND q.run_after <= now()
         ORDER BY q.priority_rank, q.created_at, q.job_no
         LIMIT free_total FOR UPDATE SKIP LOCKED
    ), cand AS (
        SELECT * FROM cand_manim UNION ALL SELECT * FROM cand_other
    ), pick AS (
        SELECT cand.id FROM cand ORDER BY cand.priority_rank, cand.created_at, cand.job_no LIMIT free_total
    ), upd AS (
        UPDATE reactor.jobs j
           SET status = 'processing', attempt = j.attempt + 1, locked_by = p_reactor,
               lease_expires_at = now() + p_lease
          FROM pick WHERE j.id = pick.id
        RETURNING j.*
    )
    SELECT upd.id, upd.job_type, upd.priority, upd.payload, upd.user_id, upd.renderer,
           upd.retry_count, upd.max_retries, upd.attempt, upd.created_at,
           t.input_field, t.defaults, timeout_min
      FROM upd JOIN public.job_types t ON t.name = upd.job_type
     ORDER BY upd.priority_rank, upd.created_at, upd.job_no;
END
$$;

-- Write the outcomes of finished attempts (only where the lease is still ours: same reactor, same
-- attempt, still processing), then claim again: one round trip and one commit for both.
-- Rows with written = true name the jobs whose outcome was recorded; the others are new claims.
CREATE OR REPLACE FUNCTION reactor.finish_and_claim(p_batch jsonb, p_reactor text, p_max integer, p_lease interval,
                                         p_clock timestamptz DEFAULT now())
RETURNS TABLE (written boolean, id uuid, job_type text, priority text, payload jsonb, user_id uuid,
               renderer text, retry_count integer, max_retries integer, attempt integer,
               created_at timestamptz, input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_array_length(p_batch) > 0 THEN
        RETURN QUERY
        WITH f AS (
            UPDATE reactor.jobs j
               SET status = f.status,
                   result = f.result,
                   retry_count = f.retry_count,
                   run_after = CASE WHEN f.status = 'queued' THEN now() + make_interval(secs => f.delay_s)
                                    ELSE j.run_after END,
                   error_category = f.error_category,
                   error_message = f.error_message,
                   error_details = f.error_details
              FROM jsonb_to_recordset(p_batch) AS f(id uuid, attempt integer, status text, result jsonb,
                   retry_count integer, delay_s double precision, error_category text, error_message text,
                   error_details jsonb)
             WHERE j.id = f.id AND j.attempt = f.attempt AND j.status = 'processing' AND j.locked_by = p_reactor
            RETURNING j.id)
        SELECT true, f.id, NULL::text, NULL::text, NULL::jsonb, NULL::uuid, NULL::text, NULL::integer,
               NULL::integer, NULL::integer, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::integer
          FROM f;
    END IF;
    IF p_max > 0 THEN
        RETURN QUERY SELECT false, c.* FROM reactor.claim_jobs(p_reactor, p_max, p_lease, p_clock) c;
    END IF;
END
$$;

DELETE FROM reactor.schema_migrations WHERE version = 4;
