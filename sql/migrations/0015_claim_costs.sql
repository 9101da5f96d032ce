-- 0015_claim_costs: the claim cursors of 0008 without their cost on every commit.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0015_claim_costs.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 14` (sql/rollback/0015_claim_costs.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- 0008 made the reactor's own cycle (write an outcome, claim again: finish_and_claim) cost twice
-- the database time of 0007: 1.4-1.5 ms -> 2.6 ms a call with one outcome and one claim, on one
-- connection with nothing else running (bench/cycle_bench.py; bench/README.md, "The regression
-- found"). Found with auto_explain (log_nested_statements), perf and pg_stat_user_functions:
--
-- * reactor.cursor_lower() and reactor.cursor_keys() were SQL functions that return a record:
--   PostgreSQL does not inline those and plans their body again at every call, about 0.2 ms each.
--   append_totals() ran cursor_lower() through a LATERAL join even when its join condition then
--   threw the row away (a claim sets its cursors, most writers lower none). They are PL/pgSQL now,
--   loops over six array slots with no query, and append_totals() calls cursor_lower() only when a
--   writer has a key to lower the cursors to. Same arguments, same results.
-- * The query by which a claim finds the first job it passed without taking had a key range on
--   (created_at, job_no), which the planner could serve from jobs_created_idx, the index of every
--   job by created_at. It did, in a session whose cached plan was made while the table was small,
--   and then read every job with that created_at (all of them, after one bulk INSERT) at every
--   claim. The range is now a comparison of (priority_rank, created_at, job_no), which only the
--   claim's own partial indexes serve, and starts the scan at the cursor (with priority_rank = r as
--   well, a btree scan starts from the equality and walks the whole priority).
-- * finish_and_claim was planned again at every call: PL/pgSQL keeps custom plans for a statement
--   whose custom plans look cheaper than its generic one, and the outcomes' statement always did
--   (perf: the planner took a fifth of the backend's CPU; the function's own time 0.9 ms a call).
--   It now runs with plan_cache_mode = force_generic_plan, as claim_jobs() does (0.4 ms).
-- * its outcomes' UPDATE joined jobs to jsonb_to_recordset (estimated at 100 rows), and the
--   claim's to unnest(ids): on a freshly filled table the planner read all of jobs at every call.
--   Both also say j.id = ANY(ids) now, which only jobs_pkey serves.
--
-- Nothing else changes: the same locks in the same order, the same totals, cursors, events and
-- NOTIFY payloads.

CREATE OR REPLACE FUNCTION reactor.cursor_keys(p_renderer text[], p_rank smallint[], p_at timestamptz[], p_no bigint[],
                                               OUT at timestamptz[], OUT no bigint[])
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i integer;
    k integer;
BEGIN
    IF coalesce(cardinality(p_no), 0) = 0 THEN
        RETURN;  -- no jobs: at and no are NULL
    END IF;
    at := array_fill(NULL::timestamptz, ARRAY[6]);
    no := array_fill(NULL::bigint, ARRAY[6]);
    FOR i IN 1..cardinality(p_no) LOOP
        k := CASE WHEN p_renderer[i] = 'manim' THEN 1 ELSE 4 END + p_rank[i];
        IF no[k] IS NULL OR (p_at[i], p_no[i]) < (at[k], no[k]) THEN
            at[k] := p_at[i];
            no[k] := p_no[i];
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION reactor.cursor_lower(p_at timestamptz[], p_no bigint[], p_low_at timestamptz[],
                                                p_low_no bigint[], OUT at timestamptz[], OUT no bigint[])
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i integer;
BEGIN
    IF coalesce(cardinality(p_at), 0) = 0 THEN
        RETURN;
    END IF;
    at := p_at;
    no := p_no;
    FOR i IN 1..cardinality(p_at) LOOP
        IF p_low_at[i] IS NOT NULL AND (p_at[i], p_no[i]) > (p_low_at[i], p_low_no[i]) THEN
            at[i] := p_low_at[i];
            no[i] := p_low_no[i];
        END IF;
    END LOOP;
END
$$;

-- Take the journal lock (held to commit), then append the newest totals with a change applied; the
-- SELECT's snapshot is taken after the lock, so it reads every row committed before. The cursors are
-- set to p_cursor (a claim's) or lowered to it (every other writer; NULL: unchanged).
CREATE OR REPLACE FUNCTION reactor.append_totals(p_n bigint, p_queued bigint, p_processing bigint,
                                                 p_processing_manim bigint, p_completed bigint, p_failed bigint,
                                                 p_cancelled bigint, p_high bigint, p_medium bigint, p_low bigint,
                                                 p_cursor_at timestamptz[], p_cursor_no bigint[], p_set boolean)
RETURNS bigint  -- the new last seq
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    t      record;
    v_at   timestamptz[];
    v_no   bigint[];
    v_seq  bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7240513004);
    SELECT * INTO t FROM reactor.totals ORDER BY id DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF p_set THEN
        v_at := p_cursor_at;
        v_no := p_cursor_no;
    ELSIF p_cursor_at IS NULL THEN
        v_at := t.cursor_at;
        v_no := t.cursor_no;
    ELSE
        SELECT l.at, l.no INTO v_at, v_no FROM reactor.cursor_lower(t.cursor_at, t.cursor_no, p_cursor_at, p_cursor_no) l;
    END IF;
    INSERT INTO reactor.totals (id, seq, queued, processing, processing_manim, completed, failed, cancelled,
                                queued_high, queued_medium, queued_low, cursor_at, cursor_no)
    VALUES (t.id + 1, t.seq + p_n, t.queued + p_queued, t.processing + p_processing,
            t.processing_manim + p_processing_manim, t.completed + p_completed, t.failed + p_failed,
            t.cancelled + p_cancelled, t.queued_high + p_high, t.queued_medium + p_medium,
            t.queued_low + p_low, v_at, v_no)
    RETURNING seq INTO v_seq;
    RETURN v_seq;
END
$$;

-- 0014's claim, with the range of the query for the first job passed without taking led by
-- priority_rank and no equality on it (above)
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
             WHERE q.status = 'queued' AND q.renderer = 'manim'
               AND (q.priority_rank, q.created_at, q.job_no) >= (r, cur_at[m], cur_no[m])
               AND (q.priority_rank, q.created_at, q.job_no) <= (r, got.m_at, got.m_no)
               AND NOT (q.id = ANY(got.ids))
             ORDER BY q.priority_rank, q.created_at, q.job_no LIMIT 1;
            cur_at[m] := CASE WHEN FOUND THEN skip.created_at ELSE got.m_at END;
            cur_no[m] := CASE WHEN FOUND THEN skip.job_no ELSE got.m_no END;
        END IF;
        IF got.n - got.n_manim > 0 THEN
            SELECT q.created_at, q.job_no INTO skip FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer <> 'manim'
               AND (q.priority_rank, q.created_at, q.job_no) >= (r, cur_at[o], cur_no[o])
               AND (q.priority_rank, q.created_at, q.job_no) <= (r, got.o_at, got.o_no)
               AND NOT (q.id = ANY(got.ids))
             ORDER BY q.priority_rank, q.created_at, q.job_no LIMIT 1;
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
         WHERE j.id = ANY(ids)
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

-- 0014's finish_and_claim, with the outcomes' jobs found by id and generic plans (above)
CREATE OR REPLACE FUNCTION reactor.finish_and_claim(p_batch jsonb, p_reactor text, p_max integer,
                                                    p_lease interval, p_clock timestamptz DEFAULT now())
RETURNS TABLE (written boolean, id uuid, job_type text, priority text, payload jsonb, user_id uuid,
               renderer text, retry_count integer, max_retries integer, attempt integer,
               created_at timestamptz, input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    batch_ids uuid[];
BEGIN
    IF p_max > 0 THEN
        PERFORM pg_advisory_xact_lock(7240513002);  -- before the journal lock: one lock order
    END IF;
    IF jsonb_array_length(p_batch) > 0 THEN
        PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true);
        -- the jobs by id (jobs_pkey), whatever the planner guesses of jsonb_to_recordset (100 rows)
        batch_ids := ARRAY(SELECT (x->>'id')::uuid FROM jsonb_array_elements(p_batch) x);
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
             WHERE j.id = ANY(batch_ids) AND j.id = f.id AND j.attempt = f.attempt AND j.status = 'processing'
               AND j.locked_by = p_reactor
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

INSERT INTO reactor.schema_migrations (version, name) VALUES (15, 'claim_costs');
