-- 0009_lease_floor: nothing the reactor runs walks the processing index from its start.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0009_lease_floor.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 8` (sql/rollback/0009_lease_floor.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- Measured with bench/pressure_bench.py --profile (pg_stat_statements, nested statements): over a
-- 10-minute pinned horizon the outcome write grew from 30 to 6,879 buffers per call and from 0.8 to
-- 15-20 ms, and took the reactor's backend from 16 to 50 CPU seconds a minute. Its UPDATE joined
-- the outcomes (jsonb_to_recordset, which the planner always guesses at 100 rows) with the rows of
-- jobs_processing_idx (lease_expires_at) WHERE status = 'processing', which the statistics say holds
-- a handful: a hash join over the whole index. But the index also keeps an entry for every job
-- that passed through processing since the horizon was pinned, and no scan may mark one dead, so
-- each outcome visited them all on the heap. The sweep's expired-lease scan, the earliest-lease
-- read (min(lease_expires_at)) and the prune of totals and events walked old entries the same way.
--
-- Now:
-- * the lease index is keyed on the lease alone, WHERE lease_expires_at IS NOT NULL (the trigger
--   clears the lease whenever a job leaves processing). A statement that names a job by id and asks
--   status = 'processing' cannot use it (its predicate is not implied), so the outcome write, the
--   lease renewal and the still-held check look their jobs up by primary key whatever the
--   statistics say. Processing without a lease (set by hand) has its own index, normally empty.
-- * the sweep and the earliest-lease read take a floor (p_since): leases below it were looked at by
--   an earlier sweep of this reactor, so only the entries from the floor on are visited. A lease is
--   never moved back (claims and renewals set now() + lease), so a live lease below the floor is a
--   straggler: a sweep without a floor (the reactor makes one every few minutes, and at start)
--   finds it. With no floor (the default) they do what they did.
-- * reactor.prune(p_since, p_totals_from): events are pruned from the previous cutoff on, and
--   totals rows from the id the previous prune stopped at; every totals row but the newest goes
--   (a reader's snapshot keeps what it sees). reactor.prune_events() stays, for callers by hand.
-- * get_queue_stats() looks for the oldest queued job from the claims' cursors (0008) on; from the
--   head of the queued indexes it walked every job claimed since the horizon (the alert loop's
--   statement went from 9 to 164 ms over the 10 minutes).
-- * a queued job whose created_at or renderer is changed by hand is an event, so the claims'
--   cursors are lowered for it (before, one moved behind a cursor was never claimed).

DROP INDEX reactor.jobs_processing_idx;
CREATE INDEX jobs_lease_idx ON reactor.jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX jobs_unleased_idx ON reactor.jobs (coalesce(started_at, updated_at))
    WHERE status = 'processing' AND lease_expires_at IS NULL;

DROP FUNCTION reactor.sweep(interval, interval);
-- Put back what died: jobs whose lease expired (their reactor stopped renewing it), jobs in
-- processing with no lease for longer than p_orphan_after (set by hand), and jobs processing for
-- longer than job_timeout_minutes plus p_grace. Each goes back to queued with retry_count + 1 and
-- a TIMEOUT error, or to failed once its retries are spent. Leases below p_since are not looked at
-- (an earlier sweep did); NULL looks at every lease.
CREATE FUNCTION reactor.sweep(p_grace interval DEFAULT '30 seconds',
                              p_orphan_after interval DEFAULT '30 seconds',
                              p_since timestamptz DEFAULT NULL)
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
         WHERE j.lease_expires_at IS NOT NULL
           AND j.lease_expires_at >= coalesce(p_since, '-infinity')
           AND j.status = 'processing'
           AND (j.lease_expires_at < now() OR j.started_at < now() - cfg.timeout - p_grace)
           FOR UPDATE OF j SKIP LOCKED
    ), unleased AS (
        SELECT j.id, j.locked_by,
               CASE WHEN j.started_at < now() - cfg.timeout - p_grace THEN 'job_timeout'
                    ELSE 'lease_expired' END AS reason,
               cfg.timeout
          FROM reactor.jobs j, cfg
         WHERE j.status = 'processing' AND j.lease_expires_at IS NULL
           AND (coalesce(j.started_at, j.updated_at) < now() - p_orphan_after
                OR j.started_at < now() - cfg.timeout - p_grace)
           FOR UPDATE OF j SKIP LOCKED
    ), s AS (
        SELECT * FROM stale UNION ALL SELECT * FROM unleased
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
      FROM s
     WHERE j.id = s.id
    RETURNING j.id, j.status, s.reason, s.locked_by
$$;

DROP FUNCTION reactor.next_wakeups();
-- When the reactor should next look without being told: the earliest delayed retry, and the
-- earliest lease held by anyone (a dead reactor's lease expiring is nobody's NOTIFY), from p_since on.
CREATE FUNCTION reactor.next_wakeups(p_since timestamptz DEFAULT NULL,
                                     OUT next_due timestamptz, OUT next_lease_expiry timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT (SELECT min(j.run_after) FROM reactor.jobs j
             WHERE j.status = 'queued' AND j.run_after > j.created_at AND j.run_after > now()),
           (SELECT min(j.lease_expires_at) FROM reactor.jobs j
             WHERE j.lease_expires_at IS NOT NULL AND j.lease_expires_at >= coalesce(p_since, '-infinity')
               AND j.status = 'processing')
$$;

-- Old events (older than job_queue_config.event_retention) from p_since - retention on (NULL: all),
-- and totals rows from p_totals_from up to the newest, which stays. Returns the events deleted and
-- the id to start the next prune of totals from.
CREATE FUNCTION reactor.prune(p_since timestamptz DEFAULT NULL, p_totals_from bigint DEFAULT 0,
                              OUT events_pruned bigint, OUT totals_from bigint)
LANGUAGE sql AS $$
    WITH cfg AS (
        SELECT c.event_retention FROM public.job_queue_config c
    ), newest AS (
        SELECT t.id FROM reactor.totals t ORDER BY t.id DESC LIMIT 1
    ), totals_gone AS (
        DELETE FROM reactor.totals t USING newest
         WHERE t.id >= coalesce(p_totals_from, 0) AND t.id < newest.id
    ), gone AS (
        DELETE FROM reactor.events e USING cfg
         WHERE e.at < now() - cfg.event_retention
           AND e.at >= coalesce(p_since - cfg.event_retention, '-infinity')
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), coalesce((SELECT newest.id FROM newest), 0)
$$;

CREATE OR REPLACE FUNCTION reactor.prune_events() RETURNS bigint
LANGUAGE sql AS $$
    SELECT p.events_pruned FROM reactor.prune() p
$$;

-- get_queue_stats(): the oldest queued job is looked for from the claims' cursors (0008), not from
-- the head of the queued indexes, where every job claimed since the horizon was pinned left an entry.
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

-- A queued job moved in the queue by hand (an older created_at, the other renderer's queue) could
-- land behind a claim cursor (0008) with nothing to lower it, and wait forever: the move is now an
-- event ('reprioritized': its place changed), and the commit lowers the cursors for it like for any
-- job that becomes queued. Under the Supabase hardening (1001) the function stays its owner's.
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
       -- a queued job moved in the queue by hand: its place (and the claims' cursors) change too
       OR (n.status = 'queued' AND (n.created_at IS DISTINCT FROM o.created_at
                                    OR n.renderer IS DISTINCT FROM o.renderer))
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

INSERT INTO reactor.schema_migrations (version, name) VALUES (9, 'lease_floor');
