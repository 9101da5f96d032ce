-- Rollback of 0009_lease_floor: the processing index, the sweep, next_wakeups() and prune_events() of
-- 0001 and 0007 come back as they were.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0009_lease_floor.sql

CREATE OR REPLACE FUNCTION reactor.prune_events() RETURNS bigint
LANGUAGE sql AS $$
    WITH newest AS (
        SELECT t.id FROM reactor.totals t ORDER BY t.id DESC LIMIT 1
    ), stale AS (
        -- the newest row written over a minute ago: everything before it goes
        SELECT t.id FROM reactor.totals t WHERE t.at < now() - interval '1 minute' ORDER BY t.id DESC LIMIT 1
    ), totals_gone AS (
        DELETE FROM reactor.totals t USING stale, newest WHERE t.id < stale.id AND t.id < newest.id
    ), gone AS (
        DELETE FROM reactor.events
         WHERE at < now() - (SELECT event_retention FROM public.job_queue_config)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

DROP FUNCTION reactor.prune(timestamptz, bigint);
DROP FUNCTION reactor.next_wakeups(timestamptz);
DROP FUNCTION reactor.sweep(interval, interval, timestamptz);
DROP INDEX reactor.jobs_unleased_idx;
DROP INDEX reactor.jobs_lease_idx;
CREATE INDEX jobs_processing_idx ON reactor.jobs (lease_expires_at) WHERE status = 'processing';

-- Put back what died: jobs whose lease expired (their reactor stopped renewing it), jobs in
-- processing with no lease for longer than p_orphan_after (set by hand), and jobs processing for
-- longer than job_timeout_minutes plus p_grace. Each goes back to queued with retry_count + 1 and
-- a TIMEOUT error, or to failed once its retries are spent.
CREATE FUNCTION reactor.sweep(p_grace interval DEFAULT '30 seconds',
                              p_orphan_after interval DEFAULT '30 seconds')
RETURNS TABLE (id uuid, status text, reason text, held_by text)
LANGUAGE sql AS $$
    WITH cfg AS (
        SELECT make_interval(mins => c.job_timeout_minutes) AS timeout FROM public.job_queue_config c
    ), stale AS (
        SELECT j.id, j.locked_by,
               CASE WHEN j.started_at < now() - cfg.timeout - p_grace THEN 'job_timeout'
                    ELSE 'lease_expired' END AS reason,
               cfg.timeout
          FROM reactor.jobs j, cfg
         WHERE j.status = 'processing'
           AND (j.lease_expires_at < now()
                OR (j.lease_expires_at IS NULL AND coalesce(j.started_at, j.updated_at) < now() - p_orphan_after)
                OR j.started_at < now() - cfg.timeout - p_grace)
           FOR UPDATE OF j SKIP LOCKED
    )
    UPDATE reactor.jobs j
       SET status = CASE WHEN j.retry_count < j.max_retries THEN 'queued' ELSE 'failed' END,
           retry_count = CASE WHEN j.retry_count < j.max_retries THEN j.retry_count + 1 ELSE j.retry_count END,
           run_after = now(),
           error_category = 'TIMEOUT',
           error_message = CASE s.reason
               WHEN 'job_timeout' THEN 'timed out: processing for longer than ' || s.timeout::text
               ELSE 'lease expired: ' || coalesce('reactor ' || s.locked_by, 'no reactor') ||
                    ' stopped renewing it (crashed or cut off)' END,
           error_details = jsonb_build_object('reason', s.reason, 'held_by', s.locked_by,
                                              'started_at', j.started_at, 'at', now())
      FROM stale s
     WHERE j.id = s.id
    RETURNING j.id, j.status, s.reason, s.locked_by
$$;

-- When the reactor should next look without being told: the earliest delayed retry, and the
-- earliest lease held by anyone (a dead reactor's lease expiring is nobody's NOTIFY).
CREATE FUNCTION reactor.next_wakeups(OUT next_due timestamptz, OUT next_lease_expiry timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT (SELECT min(j.run_after) FROM reactor.jobs j
             WHERE j.status = 'queued' AND j.run_after > j.created_at AND j.run_after > now()),
           (SELECT min(j.lease_expires_at) FROM reactor.jobs j WHERE j.status = 'processing')
$$;


CREATE OR REPLACE FUNCTION public.get_queue_stats(
    OUT total bigint, OUT queued bigint, OUT processing bigint, OUT completed bigint,
    OUT failed bigint, OUT cancelled bigint,
    OUT queued_high bigint, OUT queued_medium bigint, OUT queued_low bigint,
    OUT avg_wait_seconds double precision, OUT avg_processing_seconds double precision,
    OUT oldest_queued_at timestamptz, OUT oldest_queued_age_seconds double precision,
    OUT completed_last_hour bigint, OUT failed_last_hour bigint,
    OUT max_renders integer, OUT max_manim_renders integer, OUT peak boolean, OUT paused boolean,
    OUT last_seq bigint, OUT as_of timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH oldest AS (
        SELECT min(m.created_at) AS at
        FROM (VALUES (0::smallint), (1::smallint), (2::smallint)) r(rank),
        LATERAL (
            (SELECT j.created_at FROM reactor.jobs j
              WHERE j.status = 'queued' AND j.renderer = 'manim' AND j.priority_rank = r.rank
              ORDER BY j.created_at LIMIT 1)
            UNION ALL
            (SELECT j.created_at FROM reactor.jobs j
              WHERE j.status = 'queued' AND j.renderer <> 'manim' AND j.priority_rank = r.rank
              ORDER BY j.created_at LIMIT 1)
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

CREATE OR REPLACE FUNCTION reactor.stage_updates() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reactor.event_stage
        (job_id, kind, status, old_status, priority, old_priority, job_type, renderer, user_id,
         retry_count, error_category, actor)
    SELECT n.id,
           CASE
               WHEN n.status IS NOT DISTINCT FROM o.status THEN 'reprioritized'
               WHEN n.status = 'processing' THEN 'started'
               WHEN n.status = 'queued' AND o.status = 'processing' THEN 'retrying'
               WHEN n.status = 'queued' THEN 'requeued'
               ELSE n.status
           END,
           n.status, o.status, n.priority, o.priority, n.job_type, n.renderer, n.user_id,
           n.retry_count, n.error_category, reactor.current_actor()
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status OR n.priority IS DISTINCT FROM o.priority
    ORDER BY n.job_no;
    IF FOUND THEN
        INSERT INTO reactor.pending_commits VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        ALTER FUNCTION reactor.stage_updates() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

DELETE FROM reactor.schema_migrations WHERE version = 9;
