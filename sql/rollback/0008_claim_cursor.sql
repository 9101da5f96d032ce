-- Rollback of 0008_claim_cursor: claims read the queue from its head again; the functions of 0007
-- come back as they were.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0008_claim_cursor.sql

DROP FUNCTION reactor.append_totals(bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint,
                                    timestamptz[], bigint[], boolean);
-- Take the journal lock (held to commit), then append the newest totals with a change applied; the
-- INSERT's snapshot is taken after the lock, so it reads every row committed before.
CREATE FUNCTION reactor.append_totals(p_n bigint, p_queued bigint, p_processing bigint,
                                      p_processing_manim bigint, p_completed bigint, p_failed bigint,
                                      p_cancelled bigint, p_high bigint, p_medium bigint, p_low bigint)
RETURNS bigint  -- the new last seq
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(7240513004);
    INSERT INTO reactor.totals (id, seq, queued, processing, processing_manim, completed, failed, cancelled,
                                queued_high, queued_medium, queued_low)
    SELECT t.id + 1, t.seq + p_n, t.queued + p_queued, t.processing + p_processing,
           t.processing_manim + p_processing_manim, t.completed + p_completed, t.failed + p_failed,
           t.cancelled + p_cancelled, t.queued_high + p_high, t.queued_medium + p_medium,
           t.queued_low + p_low
      FROM (SELECT * FROM reactor.totals ORDER BY id DESC LIMIT 1) t
    RETURNING seq
$$;

CREATE OR REPLACE FUNCTION reactor.sequence_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    me   xid8 := NEW.xid;
    d    record;
    last bigint;
    msg  text;
BEGIN
    DELETE FROM reactor.pending_commits WHERE xid = me;
    SELECT count(*) AS n,
           count(*) FILTER (WHERE status = 'queued')     - count(*) FILTER (WHERE old_status = 'queued')     AS queued,
           count(*) FILTER (WHERE status = 'processing') - count(*) FILTER (WHERE old_status = 'processing') AS processing,
           count(*) FILTER (WHERE status = 'processing' AND renderer = 'manim')
               - count(*) FILTER (WHERE old_status = 'processing' AND renderer = 'manim')                    AS processing_manim,
           count(*) FILTER (WHERE status = 'completed')  - count(*) FILTER (WHERE old_status = 'completed')  AS completed,
           count(*) FILTER (WHERE status = 'failed')     - count(*) FILTER (WHERE old_status = 'failed')     AS failed,
           count(*) FILTER (WHERE status = 'cancelled')  - count(*) FILTER (WHERE old_status = 'cancelled')  AS cancelled,
           count(*) FILTER (WHERE status = 'queued' AND priority = 'high')
               - count(*) FILTER (WHERE old_status = 'queued' AND coalesce(old_priority, priority) = 'high')   AS q_high,
           count(*) FILTER (WHERE status = 'queued' AND priority = 'medium')
               - count(*) FILTER (WHERE old_status = 'queued' AND coalesce(old_priority, priority) = 'medium') AS q_medium,
           count(*) FILTER (WHERE status = 'queued' AND priority = 'low')
               - count(*) FILTER (WHERE old_status = 'queued' AND coalesce(old_priority, priority) = 'low')    AS q_low,
           count(*) FILTER (WHERE status = 'queued' AND old_status IS DISTINCT FROM 'queued')  AS became_queued,
           count(*) FILTER (WHERE old_status = 'processing' AND status IS DISTINCT FROM 'processing') AS freed,
           count(*) FILTER (WHERE kind = 'cancelled') AS cancelled_now
      INTO d
      FROM reactor.event_stage WHERE xid = me;
    IF d.n = 0 THEN
        RETURN NULL;
    END IF;
    last := reactor.append_totals(d.n, d.queued, d.processing, d.processing_manim, d.completed, d.failed,
                                  d.cancelled, d.q_high, d.q_medium, d.q_low);
    WITH moved AS (
        DELETE FROM reactor.event_stage WHERE xid = me
        RETURNING ord, job_id, kind, status, old_status, priority, job_type, renderer, user_id,
                  retry_count, error_category, actor)
    INSERT INTO reactor.events (seq, job_id, kind, status, old_status, priority, job_type, renderer,
                                user_id, retry_count, error_category, actor)
    SELECT last - d.n + row_number() OVER (ORDER BY ord), job_id, kind, status, old_status, priority,
           job_type, renderer, user_id, retry_count, error_category, actor
    FROM moved;
    IF d.n = 1 THEN
        SELECT json_build_object('seq', e.seq, 'n', 1, 'kind', e.kind, 'id', e.job_id,
                                 'status', e.status, 'old_status', e.old_status, 'priority', e.priority,
                                 'job_type', e.job_type, 'renderer', e.renderer,
                                 'user_id', e.user_id, 'actor', e.actor)::text
          INTO msg FROM reactor.events e WHERE e.seq = last;
    ELSE
        -- q: jobs that became queued, f: jobs that left processing, c: cancellations
        msg := json_build_object('seq', last, 'n', d.n, 'q', d.became_queued, 'f', d.freed,
                                 'c', d.cancelled_now, 'actor', reactor.current_actor())::text;
    END IF;
    PERFORM pg_notify('reactor_events', msg);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION reactor.claim_jobs(p_reactor text, p_max integer, p_lease interval,
                                              p_clock timestamptz DEFAULT now())
RETURNS TABLE (id uuid, job_type text, priority text, payload jsonb, user_id uuid, renderer text,
               retry_count integer, max_retries integer, attempt integer, created_at timestamptz,
               input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    lim         record;
    free_total  integer;
    free_manim  integer;
    due         timestamptz;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7240513002);
    -- the limits in effect (reactor.effective_limits(), inlined) and what is in flight, from the newest
    -- totals: every claim and every change of a job's status appended its row before it committed,
    -- and this statement's snapshot is taken after the lock
    SELECT c.max_concurrent_renders = 0 AS paused,
           CASE WHEN p.is_peak AND c.max_concurrent_renders > 0
                THEN greatest(1, floor(c.max_concurrent_renders * c.peak_worker_multiplier))::integer
                ELSE c.max_concurrent_renders END AS max_renders,
           CASE WHEN p.is_peak AND c.max_manim_renders > 0
                THEN greatest(1, floor(c.max_manim_renders * c.peak_worker_multiplier))::integer
                ELSE c.max_manim_renders END AS max_manim,
           c.job_timeout_minutes, r.processing AS run_total, r.processing_manim AS run_manim
      INTO lim
      FROM public.job_queue_config c,
           LATERAL (SELECT (p_clock AT TIME ZONE c.timezone)::time AS t) lt,
           LATERAL (SELECT coalesce(CASE
                WHEN c.peak_hour_start IS NULL OR c.peak_hour_start = c.peak_hour_end THEN false
                WHEN c.peak_hour_start < c.peak_hour_end
                    THEN lt.t >= c.peak_hour_start AND lt.t < c.peak_hour_end
                ELSE lt.t >= c.peak_hour_start OR lt.t < c.peak_hour_end
           END, false) AS is_peak) p,
           LATERAL (SELECT t.processing, t.processing_manim FROM reactor.totals t ORDER BY t.id DESC LIMIT 1) r;
    IF lim.paused THEN
        RETURN;
    END IF;
    free_total := least(lim.max_renders - lim.run_total, p_max);
    IF free_total <= 0 THEN
        RETURN;
    END IF;
    free_manim := greatest(least(lim.max_manim - lim.run_manim, free_total), 0);
    -- due by now, not by the start of the transaction: a job committed while this claim waited
    -- for the lock is ours to take
    due := clock_timestamp();
    PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true);
    RETURN QUERY
    WITH cand_manim AS (
        SELECT q.id, q.priority_rank, q.created_at, q.job_no FROM reactor.jobs q
         WHERE q.status = 'queued' AND q.renderer = 'manim' AND q.run_after <= due
         ORDER BY q.priority_rank, q.created_at, q.job_no
         LIMIT free_manim FOR UPDATE SKIP LOCKED
    ), cand_other AS (
        SELECT q.id, q.priority_rank, q.created_at, q.job_no FROM reactor.jobs q
         WHERE q.status = 'queued' AND q.renderer <> 'manim' AND q.run_after <= due
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
    ), n AS (
        -- every row taken was queued (FOR UPDATE rechecked it) and keeps its priority
        SELECT count(*) AS n, count(*) FILTER (WHERE upd.renderer = 'manim') AS manim,
               count(*) FILTER (WHERE upd.priority = 'high') AS high,
               count(*) FILTER (WHERE upd.priority = 'medium') AS medium,
               count(*) FILTER (WHERE upd.priority = 'low') AS low
          FROM upd
    ), ctr AS (
        SELECT reactor.append_totals(n.n, -n.n, n.n, n.manim, 0, 0, 0, -n.high, -n.medium, -n.low) AS last_seq, n.n
          FROM n WHERE n.n > 0
    ), ev AS (
        INSERT INTO reactor.events AS e (seq, job_id, kind, status, old_status, priority, job_type, renderer,
                                         user_id, retry_count, error_category, actor)
        SELECT ctr.last_seq - ctr.n + row_number() OVER (ORDER BY upd.priority_rank, upd.created_at, upd.job_no),
               upd.id, 'started', 'processing', 'queued', upd.priority, upd.job_type, upd.renderer,
               upd.user_id, upd.retry_count, upd.error_category, reactor.current_actor()
          FROM upd, ctr
        RETURNING e.seq, e.job_id, e.priority, e.job_type, e.renderer, e.user_id, e.actor
    ), notice AS (
        -- the payloads of reactor.sequence_commit(): one event in full, more as counts
        SELECT pg_notify('reactor_events', CASE WHEN count(*) = 1 THEN
                   json_build_object('seq', max(ev.seq), 'n', 1, 'kind', 'started', 'id', min(ev.job_id::text),
                                     'status', 'processing', 'old_status', 'queued', 'priority', min(ev.priority),
                                     'job_type', min(ev.job_type), 'renderer', min(ev.renderer),
                                     'user_id', min(ev.user_id::text), 'actor', min(ev.actor))::text
                   ELSE json_build_object('seq', max(ev.seq), 'n', count(*), 'q', 0, 'f', 0, 'c', 0,
                                          'actor', min(ev.actor))::text END) AS sent
          FROM ev HAVING count(*) > 0
    )
    SELECT upd.id, upd.job_type, upd.priority, upd.payload, upd.user_id, upd.renderer,
           upd.retry_count, upd.max_retries, upd.attempt, upd.created_at,
           t.input_field, t.defaults, lim.job_timeout_minutes
      FROM upd JOIN public.job_types t ON t.name = upd.job_type
     WHERE (SELECT count(*) FROM notice) >= 0   -- a CTE that is not data-modifying runs only when read
     ORDER BY upd.priority_rank, upd.created_at, upd.job_no;
    PERFORM set_config('reactor.journal', '', true);
END
$$;

CREATE OR REPLACE FUNCTION reactor.finish_and_claim(p_batch jsonb, p_reactor text, p_max integer,
                                                    p_lease interval, p_clock timestamptz DEFAULT now())
RETURNS TABLE (written boolean, id uuid, job_type text, priority text, payload jsonb, user_id uuid,
               renderer text, retry_count integer, max_retries integer, attempt integer,
               created_at timestamptz, input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_max > 0 THEN
        PERFORM pg_advisory_xact_lock(7240513002);  -- before the journal lock: one lock order
    END IF;
    IF jsonb_array_length(p_batch) > 0 THEN
        PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true);
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
            RETURNING j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count,
                      j.error_category, j.job_no
        ), n AS (
            -- every row written was processing; it leaves for f.status
            SELECT count(*) AS n,
                   count(*) FILTER (WHERE f.renderer = 'manim') AS manim,
                   count(*) FILTER (WHERE f.status = 'queued') AS queued,
                   count(*) FILTER (WHERE f.status = 'completed') AS completed,
                   count(*) FILTER (WHERE f.status = 'failed') AS failed,
                   count(*) FILTER (WHERE f.status = 'cancelled') AS cancelled,
                   count(*) FILTER (WHERE f.status = 'queued' AND f.priority = 'high') AS high,
                   count(*) FILTER (WHERE f.status = 'queued' AND f.priority = 'medium') AS medium,
                   count(*) FILTER (WHERE f.status = 'queued' AND f.priority = 'low') AS low
              FROM f
        ), ctr AS (
            SELECT reactor.append_totals(n.n, n.queued, -n.n, -n.manim, n.completed, n.failed, n.cancelled,
                                         n.high, n.medium, n.low) AS last_seq, n.n, n.queued, n.cancelled
              FROM n WHERE n.n > 0
        ), ev AS (
            INSERT INTO reactor.events AS e (seq, job_id, kind, status, old_status, priority, job_type,
                                             renderer, user_id, retry_count, error_category, actor)
            SELECT ctr.last_seq - ctr.n + row_number() OVER (ORDER BY f.job_no),
                   f.id, CASE WHEN f.status = 'queued' THEN 'retrying' ELSE f.status END, f.status,
                   'processing', f.priority, f.job_type, f.renderer, f.user_id, f.retry_count,
                   f.error_category, reactor.current_actor()
              FROM f, ctr
            RETURNING e.seq, e.job_id, e.kind, e.status, e.priority, e.job_type, e.renderer, e.user_id, e.actor
        ), notice AS (
            SELECT pg_notify('reactor_events', CASE WHEN count(*) = 1 THEN
                       json_build_object('seq', max(ev.seq), 'n', 1, 'kind', min(ev.kind), 'id', min(ev.job_id::text),
                                         'status', min(ev.status), 'old_status', 'processing',
                                         'priority', min(ev.priority), 'job_type', min(ev.job_type),
                                         'renderer', min(ev.renderer), 'user_id', min(ev.user_id::text),
                                         'actor', min(ev.actor))::text
                       ELSE json_build_object('seq', max(ev.seq), 'n', count(*),
                                              'q', (SELECT ctr.queued FROM ctr), 'f', count(*),
                                              'c', (SELECT ctr.cancelled FROM ctr), 'actor', min(ev.actor))::text
                       END) AS sent
              FROM ev HAVING count(*) > 0
        )
        SELECT true, f.id, NULL::text, NULL::text, NULL::jsonb, NULL::uuid, NULL::text, NULL::integer,
               NULL::integer, NULL::integer, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::integer
          FROM f
         WHERE (SELECT count(*) FROM notice) >= 0;
        PERFORM set_config('reactor.journal', '', true);
    END IF;
    IF p_max > 0 THEN
        RETURN QUERY SELECT false, c.* FROM reactor.claim_jobs(p_reactor, p_max, p_lease, p_clock) c;
    END IF;
END
$$;

DROP FUNCTION reactor.cursor_lower(timestamptz[], bigint[], timestamptz[], bigint[]);
DROP FUNCTION reactor.cursor_keys(text[], smallint[], timestamptz[], bigint[]);
ALTER TABLE reactor.totals DROP COLUMN cursor_at, DROP COLUMN cursor_no;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        ALTER FUNCTION reactor.sequence_commit() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

DELETE FROM reactor.schema_migrations WHERE version = 8;
