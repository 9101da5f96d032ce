-- Rollback of 0015_claim_costs: cursor_keys, cursor_lower and append_totals of 0008 and claim_jobs
-- of 0014 come back.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0015_claim_costs.sql

-- The lowest key of the given jobs per cursor (NULL where none of them falls).
CREATE OR REPLACE FUNCTION reactor.cursor_keys(p_renderer text[], p_rank smallint[], p_at timestamptz[], p_no bigint[],
                                    OUT at timestamptz[], OUT no bigint[])
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(m.at ORDER BY k.i), array_agg(m.no ORDER BY k.i)
      FROM generate_series(1, 6) k(i)
      LEFT JOIN (SELECT DISTINCT ON (x.i) x.i, x.at, x.no
                   FROM (SELECT CASE WHEN u.r = 'manim' THEN 1 ELSE 4 END + u.rank AS i, u.at, u.no
                           FROM unnest(p_renderer, p_rank, p_at, p_no) AS u(r, rank, at, no)) x
                  ORDER BY x.i, x.at, x.no) m ON m.i = k.i
     WHERE cardinality(p_no) > 0
$$;

-- Each cursor lowered to the given key where that is lower (a NULL key changes nothing).
CREATE OR REPLACE FUNCTION reactor.cursor_lower(p_at timestamptz[], p_no bigint[], p_low_at timestamptz[], p_low_no bigint[],
                                     OUT at timestamptz[], OUT no bigint[])
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(CASE WHEN l.at IS NULL OR (c.at, c.no) <= (l.at, l.no) THEN c.at ELSE l.at END ORDER BY c.i),
           array_agg(CASE WHEN l.at IS NULL OR (c.at, c.no) <= (l.at, l.no) THEN c.no ELSE l.no END ORDER BY c.i)
      FROM unnest(p_at, p_no) WITH ORDINALITY AS c(at, no, i)
      LEFT JOIN unnest(p_low_at, p_low_no) WITH ORDINALITY AS l(at, no, i) ON l.i = c.i
$$;

-- Take the journal lock (held to commit), then append the newest totals with a change applied; the
-- INSERT's snapshot is taken after the lock, so it reads every row committed before. The cursors are
-- set to p_cursor (a claim's) or lowered to it (every other writer; NULL: unchanged).
CREATE OR REPLACE FUNCTION reactor.append_totals(p_n bigint, p_queued bigint, p_processing bigint,
                                      p_processing_manim bigint, p_completed bigint, p_failed bigint,
                                      p_cancelled bigint, p_high bigint, p_medium bigint, p_low bigint,
                                      p_cursor_at timestamptz[], p_cursor_no bigint[], p_set boolean)
RETURNS bigint  -- the new last seq
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(7240513004);
    INSERT INTO reactor.totals (id, seq, queued, processing, processing_manim, completed, failed, cancelled,
                                queued_high, queued_medium, queued_low, cursor_at, cursor_no)
    SELECT t.id + 1, t.seq + p_n, t.queued + p_queued, t.processing + p_processing,
           t.processing_manim + p_processing_manim, t.completed + p_completed, t.failed + p_failed,
           t.cancelled + p_cancelled, t.queued_high + p_high, t.queued_medium + p_medium,
           t.queued_low + p_low,
           CASE WHEN p_set THEN p_cursor_at WHEN p_cursor_at IS NULL THEN t.cursor_at ELSE l.at END,
           CASE WHEN p_set THEN p_cursor_no WHEN p_cursor_at IS NULL THEN t.cursor_no ELSE l.no END
      FROM (SELECT * FROM reactor.totals ORDER BY id DESC LIMIT 1) t
      LEFT JOIN LATERAL reactor.cursor_lower(t.cursor_at, t.cursor_no, p_cursor_at, p_cursor_no) l
        ON NOT p_set AND p_cursor_at IS NOT NULL
    RETURNING seq
$$;

CREATE OR REPLACE FUNCTION reactor.claim_jobs(p_reactor text, p_max integer, p_lease interval,
                                              p_clock timestamptz DEFAULT now())
RETURNS TABLE (id uuid, job_type text, priority text, payload jsonb, user_id uuid, renderer text,
               retry_count integer, max_retries integer, attempt integer, created_at timestamptz,
               input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    lim         record;
    tot         record;
    got         record;
    skip        record;
    free_total  integer;
    free_manim  integer;
    due         timestamptz;
    cur_at      timestamptz[];
    cur_no      bigint[];
    r           integer;
    m           integer;  -- the cursor of manim jobs of rank r
    o           integer;  -- the cursor of the other jobs of rank r
    ids         uuid[] := '{}';
    v_more      boolean;  -- this claim filled p_max with room left in the fleet: others may claim too
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7240513002);
    -- the journal lock too, before this claim reads anything: no transaction can commit a job
    -- below the cursors between what this claim reads and the cursors it writes
    PERFORM pg_advisory_xact_lock(7240513004);
    SELECT t.* INTO tot FROM reactor.totals t ORDER BY t.id DESC LIMIT 1;
    -- the limits in effect: reactor.effective_limits(), inlined
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
    free_total := least(lim.max_renders - tot.processing, p_max);
    IF free_total <= 0 THEN
        RETURN;
    END IF;
    free_manim := greatest(least(lim.max_manim - tot.processing_manim, free_total), 0);
    -- due by now, not by the start of the transaction: a job committed while this claim waited
    -- for the lock is ours to take
    due := clock_timestamp();
    cur_at := tot.cursor_at;
    cur_no := tot.cursor_no;
    -- priority by priority, each from its cursors: what lies before a cursor left the queue (or was
    -- never due or free when a claim passed it, which kept the cursor before it), so the dead index
    -- entries a pinned horizon keeps are not walked again
    FOR r IN 0..2 LOOP
        EXIT WHEN free_total <= 0;
        CONTINUE WHEN (ARRAY[tot.queued_high, tot.queued_medium, tot.queued_low])[r + 1] <= 0;
        m := 1 + r;
        o := 4 + r;
        WITH cand_manim AS (
            SELECT q.id, q.created_at, q.job_no, true AS manim FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer = 'manim' AND q.priority_rank = r
               AND (q.created_at, q.job_no) >= (cur_at[m], cur_no[m]) AND q.run_after <= due
             ORDER BY q.created_at, q.job_no
             LIMIT least(free_manim, free_total) FOR UPDATE SKIP LOCKED
        ), cand_other AS (
            SELECT q.id, q.created_at, q.job_no, false AS manim FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer <> 'manim' AND q.priority_rank = r
               AND (q.created_at, q.job_no) >= (cur_at[o], cur_no[o]) AND q.run_after <= due
             ORDER BY q.created_at, q.job_no
             LIMIT free_total FOR UPDATE SKIP LOCKED
        ), pick AS (
            SELECT c.* FROM (SELECT * FROM cand_manim UNION ALL SELECT * FROM cand_other) c
             ORDER BY c.created_at, c.job_no LIMIT free_total
        )
        SELECT coalesce(array_agg(pick.id ORDER BY pick.created_at, pick.job_no), '{}') AS ids,
               count(*) AS n, count(*) FILTER (WHERE pick.manim) AS n_manim,
               (array_agg(pick.created_at ORDER BY pick.created_at DESC, pick.job_no DESC)
                    FILTER (WHERE pick.manim))[1] AS m_at,
               (array_agg(pick.job_no ORDER BY pick.created_at DESC, pick.job_no DESC)
                    FILTER (WHERE pick.manim))[1] AS m_no,
               (array_agg(pick.created_at ORDER BY pick.created_at DESC, pick.job_no DESC)
                    FILTER (WHERE NOT pick.manim))[1] AS o_at,
               (array_agg(pick.job_no ORDER BY pick.created_at DESC, pick.job_no DESC)
                    FILTER (WHERE NOT pick.manim))[1] AS o_no
          INTO got FROM pick;
        -- each cursor moves to the first job this claim passed without taking (another writer held
        -- it, or it is not due yet), else to the last one it took
        IF got.n_manim > 0 THEN
            SELECT q.created_at, q.job_no INTO skip FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer = 'manim' AND q.priority_rank = r
               AND (q.created_at, q.job_no) >= (cur_at[m], cur_no[m])
               AND (q.created_at, q.job_no) <= (got.m_at, got.m_no) AND NOT (q.id = ANY(got.ids))
             ORDER BY q.created_at, q.job_no LIMIT 1;
            cur_at[m] := CASE WHEN FOUND THEN skip.created_at ELSE got.m_at END;
            cur_no[m] := CASE WHEN FOUND THEN skip.job_no ELSE got.m_no END;
        END IF;
        IF got.n - got.n_manim > 0 THEN
            SELECT q.created_at, q.job_no INTO skip FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer <> 'manim' AND q.priority_rank = r
               AND (q.created_at, q.job_no) >= (cur_at[o], cur_no[o])
               AND (q.created_at, q.job_no) <= (got.o_at, got.o_no) AND NOT (q.id = ANY(got.ids))
             ORDER BY q.created_at, q.job_no LIMIT 1;
            cur_at[o] := CASE WHEN FOUND THEN skip.created_at ELSE got.o_at END;
            cur_no[o] := CASE WHEN FOUND THEN skip.job_no ELSE got.o_no END;
        END IF;
        ids := ids || got.ids;
        free_total := free_total - got.n;
        free_manim := free_manim - got.n_manim;
    END LOOP;
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    -- a claim that took fewer than p_max stopped at a limit or at the end of what is due: nobody
    -- else can take more now. One that took p_max while the fleet has room left says so in its
    -- NOTIFY ("more"), so that the others claim the rest.
    v_more := cardinality(ids) >= p_max AND lim.max_renders - tot.processing > p_max;
    PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true);
    RETURN QUERY
    WITH upd AS (
        UPDATE reactor.jobs j
           SET status = 'processing', attempt = j.attempt + 1, locked_by = p_reactor,
               lease_expires_at = now() + p_lease
          FROM unnest(ids) AS pick(id) WHERE j.id = pick.id
        RETURNING j.*
    ), n AS (
        -- every row taken was queued (FOR UPDATE rechecked it) and keeps its priority
        SELECT count(*) AS n, count(*) FILTER (WHERE upd.renderer = 'manim') AS manim,
               count(*) FILTER (WHERE upd.priority = 'high') AS high,
               count(*) FILTER (WHERE upd.priority = 'medium') AS medium,
               count(*) FILTER (WHERE upd.priority = 'low') AS low
          FROM upd
    ), ctr AS (
        SELECT reactor.append_totals(n.n, -n.n, n.n, n.manim, 0, 0, 0, -n.high, -n.medium, -n.low,
                                     cur_at, cur_no, true) AS last_seq, n.n
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
        -- (with "more": true when others should claim too)
        SELECT pg_notify('reactor_events', CASE WHEN v_more THEN (m.msg::jsonb || '{"more": true}')::text
                                                ELSE m.msg END) AS sent
          FROM (SELECT CASE WHEN count(*) = 1 THEN
                   json_build_object('seq', max(ev.seq), 'n', 1, 'kind', 'started', 'id', min(ev.job_id::text),
                                     'status', 'processing', 'old_status', 'queued', 'priority', min(ev.priority),
                                     'job_type', min(ev.job_type), 'renderer', min(ev.renderer),
                                     'user_id', min(ev.user_id::text), 'actor', min(ev.actor))::text
                   ELSE json_build_object('seq', max(ev.seq), 'n', count(*), 'q', 0, 'f', 0, 'c', 0,
                                          'actor', min(ev.actor))::text END AS msg
                  FROM ev HAVING count(*) > 0) m
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
                      j.error_category, j.job_no, j.created_at, j.priority_rank
        ), low AS (
            -- retried jobs are queued again at their old place: the claims' cursors must not pass them
            SELECT * FROM reactor.cursor_keys(ARRAY(SELECT f.renderer FROM f WHERE f.status = 'queued' ORDER BY f.job_no),
                                              ARRAY(SELECT f.priority_rank FROM f WHERE f.status = 'queued' ORDER BY f.job_no),
                                              ARRAY(SELECT f.created_at FROM f WHERE f.status = 'queued' ORDER BY f.job_no),
                                              ARRAY(SELECT f.job_no FROM f WHERE f.status = 'queued' ORDER BY f.job_no))
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
                                         n.high, n.medium, n.low, low.at, low.no, false) AS last_seq,
                   n.n, n.queued, n.cancelled
              FROM n, low WHERE n.n > 0
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
            -- with "claiming": true when this transaction goes on to claim: what it frees, it takes
            -- itself as far as p_max allows (its claim's NOTIFY says "more" when others should claim)
            SELECT pg_notify('reactor_events', CASE WHEN p_max > 0 OR current_setting('reactor.claiming', true) = 'on'
                                                    THEN (m.msg::jsonb || '{"claiming": true}')::text
                                                    ELSE m.msg END) AS sent
              FROM (SELECT CASE WHEN count(*) = 1 THEN
                       json_build_object('seq', max(ev.seq), 'n', 1, 'kind', min(ev.kind), 'id', min(ev.job_id::text),
                                         'status', min(ev.status), 'old_status', 'processing',
                                         'priority', min(ev.priority), 'job_type', min(ev.job_type),
                                         'renderer', min(ev.renderer), 'user_id', min(ev.user_id::text),
                                         'actor', min(ev.actor))::text
                       ELSE json_build_object('seq', max(ev.seq), 'n', count(*),
                                              'q', (SELECT ctr.queued FROM ctr), 'f', count(*),
                                              'c', (SELECT ctr.cancelled FROM ctr), 'actor', min(ev.actor))::text
                       END AS msg
                      FROM ev HAVING count(*) > 0) m
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

DELETE FROM reactor.schema_migrations WHERE version = 15;
