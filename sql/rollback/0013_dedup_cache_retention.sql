-- Rollback of 0013_dedup_cache_retention: no deduplication, no render cache, no retention of jobs,
-- positions as 0011 left them; every object 0013 replaced is put back as 0011 (or 0001, for the
-- journal's functions and the primary key of reactor.jobs) made it; 0012_commit_path replaced none
-- of them, and what it made (reactor.sequence_commit()) 0013 never touched, so this ends at 0012.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0013_dedup_cache_retention.sql
-- jobs.idempotency_key stays: it is 0011's.

-- 4. Positions of due jobs -------------------------------------------------------------------------

-- the view of 0011 (CREATE OR REPLACE keeps its privileges, which the Supabase hardening may have set)
CREATE OR REPLACE VIEW public.jobs WITH (security_invoker = true) AS
SELECT j.id,
       j.job_type,
       j.priority,
       j.status,
       j.payload,
       j.result,
       j.user_id,
       j.renderer,
       -- NULL until due: a job that waits for its run_after has no place in the queue yet
       CASE WHEN j.status = 'queued' AND j.run_after <= now()
            THEN reactor.queue_position_at(j.priority_rank, j.created_at, j.job_no,
                     (SELECT reactor.queue_ends_keys(64)), (SELECT reactor.queue_ends_positions(64)),
                     (SELECT reactor.queue_above()),
                     (SELECT ARRAY[reactor.queue_split(0::smallint), reactor.queue_split(1::smallint),
                                   reactor.queue_split(2::smallint)]),
                     (SELECT reactor.queue_band_keys(0::smallint, false)),
                     (SELECT reactor.queue_band_keys(0::smallint, true)),
                     (SELECT reactor.queue_band_keys(1::smallint, false)),
                     (SELECT reactor.queue_band_keys(1::smallint, true)),
                     (SELECT reactor.queue_band_keys(2::smallint, false)),
                     (SELECT reactor.queue_band_keys(2::smallint, true))) END AS queue_position,
       j.retry_count,
       j.max_retries,
       j.error_message,
       j.error_category,
       j.error_details,
       j.created_at,
       j.updated_at,
       j.started_at,
       j.completed_at,
       j.run_after,
       j.attempt,
       j.locked_by,
       j.lease_expires_at,
       j.schedule_name,
       j.idempotency_key
FROM reactor.jobs j;

DROP FUNCTION reactor.queue_waiting_keys();

-- 3. Retention ------------------------------------------------------------------------------------

DROP FUNCTION reactor.prune_jobs(integer, timestamptz);
DROP TRIGGER jobs_stage_deletes ON reactor.jobs;
CREATE TRIGGER jobs_stage_deletes AFTER DELETE ON reactor.jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION reactor.stage_deletes();
ALTER TABLE public.job_queue_config DROP COLUMN job_retention;

-- 2. Render cache ---------------------------------------------------------------------------------

DROP FUNCTION reactor.finish_settle_and_claim(jsonb, text, integer, interval, timestamptz, jsonb);
DROP FUNCTION reactor.render_cache_claim(uuid, text, jsonb, interval);
DROP FUNCTION reactor.render_cache_request(text, jsonb, text, jsonb, jsonb);
DROP FUNCTION reactor.render_cache_settle(jsonb, uuid[]);
DROP FUNCTION reactor.render_cache_take(uuid, integer, text, text, jsonb, interval);
DROP TABLE reactor.render_cache;
DROP INDEX reactor.jobs_cache_wait_idx;
ALTER TABLE reactor.jobs DROP COLUMN cache_key;
ALTER TABLE public.job_types DROP COLUMN cache_ttl;

-- get_queue_stats() of 0009
DROP FUNCTION public.get_queue_stats();
CREATE FUNCTION public.get_queue_stats(
    OUT total bigint, OUT queued bigint, OUT processing bigint, OUT completed bigint,
    OUT failed bigint, OUT cancelled bigint,
    OUT queued_high bigint, OUT queued_medium bigint, OUT queued_low bigint,
    OUT avg_wait_seconds double precision, OUT avg_processing_seconds double precision,
    OUT oldest_queued_at timestamptz, OUT oldest_queued_age_seconds double precision,
    OUT completed_last_hour bigint, OUT failed_last_hour bigint,
    OUT max_renders integer, OUT max_manim_renders integer, OUT peak boolean, OUT paused boolean,
    OUT last_seq bigint, OUT as_of timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH cur AS (
        SELECT t.cursor_at, t.cursor_no FROM reactor.totals t ORDER BY t.id DESC LIMIT 1
    ), oldest AS (
        -- from the claims' cursors: no queued job lies before its queue's cursor
        SELECT min(m.created_at) AS at
        FROM cur, (VALUES (0::smallint), (1::smallint), (2::smallint)) r(rank),
        LATERAL (
            (SELECT j.created_at FROM reactor.jobs j
              WHERE j.status = 'queued' AND j.renderer = 'manim' AND j.priority_rank = r.rank
                AND (j.created_at, j.job_no) >= (cur.cursor_at[1 + r.rank], cur.cursor_no[1 + r.rank])
              ORDER BY j.created_at, j.job_no LIMIT 1)
            UNION ALL
            (SELECT j.created_at FROM reactor.jobs j
              WHERE j.status = 'queued' AND j.renderer <> 'manim' AND j.priority_rank = r.rank
                AND (j.created_at, j.job_no) >= (cur.cursor_at[4 + r.rank], cur.cursor_no[4 + r.rank])
              ORDER BY j.created_at, j.job_no LIMIT 1)
        ) m
    ), started AS (
        SELECT avg(extract(epoch FROM j.started_at - j.created_at))::double precision AS wait
        FROM reactor.jobs j WHERE j.started_at >= now() - interval '1 hour'
    ), finished AS (
        SELECT count(*) FILTER (WHERE j.status = 'completed') AS completed,
               count(*) FILTER (WHERE j.status = 'failed') AS failed,
               avg(extract(epoch FROM j.completed_at - j.started_at))
                   FILTER (WHERE j.status = 'completed' AND j.started_at IS NOT NULL)::double precision AS run
        FROM reactor.jobs j WHERE j.completed_at >= now() - interval '1 hour'
    )
    SELECT c.queued + c.processing + c.completed + c.failed + c.cancelled,
           c.queued, c.processing, c.completed, c.failed, c.cancelled,
           c.queued_high, c.queued_medium, c.queued_low,
           started.wait, finished.run,
           oldest.at, extract(epoch FROM now() - oldest.at)::double precision,
           finished.completed, finished.failed,
           l.max_renders, l.max_manim, l.peak, l.paused,
           c.last_seq, now()
    FROM reactor.counters c, oldest, started, finished, reactor.effective_limits(now()) l
$$;
COMMENT ON FUNCTION public.get_queue_stats() IS
    'Queue figures in one row (psql: SELECT * FROM get_queue_stats(); PostgREST: POST /rest/v1/rpc/get_queue_stats). '
    'Averages cover the last hour and are NULL when nothing started or completed in it.';
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        REVOKE ALL ON FUNCTION public.get_queue_stats() FROM PUBLIC, anon, authenticated, service_role;
        GRANT EXECUTE ON FUNCTION public.get_queue_stats() TO authenticated, service_role;
    END IF;
END
$$;

-- 1. Deduplication --------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION reactor.stage_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reactor.event_stage
        (job_id, kind, status, priority, job_type, renderer, user_id, retry_count, error_category, actor)
    SELECT n.id, 'inserted', n.status, n.priority, n.job_type, n.renderer, n.user_id, n.retry_count,
           n.error_category, reactor.current_actor()
    FROM new_rows n ORDER BY n.job_no;
    IF FOUND THEN
        INSERT INTO reactor.pending_commits VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION reactor.stage_deletes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reactor.event_stage
        (job_id, kind, old_status, old_priority, priority, job_type, renderer, user_id, retry_count,
         error_category, actor)
    SELECT o.id, 'deleted', o.status, o.priority, o.priority, o.job_type, o.renderer, o.user_id,
           o.retry_count, o.error_category, reactor.current_actor()
    FROM old_rows o ORDER BY o.job_no;
    IF FOUND THEN
        INSERT INTO reactor.pending_commits VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        ALTER FUNCTION reactor.stage_inserts() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
        ALTER FUNCTION reactor.stage_deletes() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

-- schedule_job() of 0011 (its ON CONFLICT without an arbiter needs the plain primary key below)
CREATE OR REPLACE FUNCTION reactor.schedule_job(s public.job_schedules, p_slot timestamptz) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    slot_text text := reactor.slot_text(p_slot);
    job       uuid;
BEGIN
    INSERT INTO reactor.jobs (job_type, priority, payload, schedule_name, idempotency_key)
    VALUES (s.job_type, s.priority,
            reactor.expand_payload(s.payload, to_char(p_slot AT TIME ZONE s.timezone, 'YYYY-MM-DD'), slot_text),
            s.name, 'schedule:' || s.name || ':' || slot_text)
    ON CONFLICT DO NOTHING
    RETURNING id INTO job;
    RETURN job;
END
$$;

DROP TRIGGER "Jobs_drop_idempotent_standin" ON reactor.jobs;
DROP FUNCTION reactor.jobs_drop_standin();
DROP TRIGGER jobs_submit_once ON reactor.jobs;
DROP FUNCTION reactor.jobs_idempotent_insert();
DROP INDEX reactor.jobs_idempotency_idx;
ALTER TABLE reactor.jobs DROP CONSTRAINT jobs_pkey, ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);
ALTER TABLE reactor.jobs DROP COLUMN idempotent_standin;

DELETE FROM reactor.schema_migrations WHERE version = 13;
