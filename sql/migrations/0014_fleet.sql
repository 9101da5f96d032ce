-- 0014_fleet: several reactors on one database wake each other only when there is work for them.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0014_fleet.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 13` (sql/rollback/0014_fleet.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- A reactor writes its outcomes and claims again in one transaction (finish_and_claim): the room its
-- finished jobs free, it takes itself. Yet every reactor woke on the NOTIFY of those outcomes and
-- claimed, found the room taken, and had queued for the claim and journal locks to learn it: with
-- three reactors on 6,000 jobs (bench/fleet_bench.py) two claims in three found nothing and a third of
-- the reactors' database time was spent waiting for the claim lock.
--
-- Now the outcomes' NOTIFY carries "claiming": true when the same transaction claims after them, and
-- a claim's NOTIFY carries "more": true when it took all it asked for (p_max) while the fleet's
-- limits leave room. A reactor claims on the first only when it says more. Nothing else changes: a
-- claim that took fewer than p_max stopped at the limits or at the end of what is due, where no other
-- claim could take more either. Reactors of an earlier version ignore both keys and wake as before.

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


-- 0013's finish_settle_and_claim (the render cache settled between outcomes and claim) writes the
-- outcomes through finish_and_claim with p_max 0 and claims after: it tells finish_and_claim so.
CREATE OR REPLACE FUNCTION reactor.finish_settle_and_claim(p_batch jsonb, p_reactor text, p_max integer,
                                                p_lease interval, p_clock timestamptz DEFAULT now(),
                                                p_fallback jsonb DEFAULT '{}')
RETURNS TABLE (written boolean, id uuid, job_type text, priority text, payload jsonb, user_id uuid,
               renderer text, retry_count integer, max_retries integer, attempt integer,
               created_at timestamptz, input_field text, type_defaults jsonb, timeout_minutes integer,
               cache_key text, cache_state text)
LANGUAGE plpgsql AS $$
DECLARE
    r    record;
    req  jsonb;
    done uuid[] := '{}';
BEGIN
    IF p_max > 0 THEN
        PERFORM pg_advisory_xact_lock(7240513002);  -- before the journal lock: one lock order
    END IF;
    cache_key := NULL;
    cache_state := NULL;
    -- the outcomes are written with p_max 0 (the render cache settles before the claim), but this
    -- transaction claims after them: their NOTIFY says so ("claiming", read by finish_and_claim)
    PERFORM set_config('reactor.claiming', CASE WHEN p_max > 0 THEN 'on' ELSE '' END, true);
    FOR r IN SELECT * FROM reactor.finish_and_claim(p_batch, p_reactor, 0, p_lease, p_clock) LOOP
        done := done || r.id;
        written := r.written; id := r.id; job_type := r.job_type; priority := r.priority;
        payload := r.payload; user_id := r.user_id; renderer := r.renderer; retry_count := r.retry_count;
        max_retries := r.max_retries; attempt := r.attempt; created_at := r.created_at;
        input_field := r.input_field; type_defaults := r.type_defaults; timeout_minutes := r.timeout_minutes;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('reactor.claiming', '', true);
    IF cardinality(done) > 0 AND jsonb_path_exists(p_batch, '$[*] ? (exists(@.cache_key) && @.cache_key != null)') THEN
        PERFORM reactor.render_cache_settle(p_batch, done);
    END IF;
    IF p_max > 0 THEN
        FOR r IN SELECT c.*, t.cache_ttl
                   FROM reactor.claim_jobs(p_reactor, p_max, p_lease, p_clock) c
                   LEFT JOIN public.job_types t ON t.name = c.job_type LOOP
            written := false; id := r.id; job_type := r.job_type; priority := r.priority;
            payload := r.payload; user_id := r.user_id; renderer := r.renderer; retry_count := r.retry_count;
            max_retries := r.max_retries; attempt := r.attempt; created_at := r.created_at;
            input_field := r.input_field; type_defaults := r.type_defaults; timeout_minutes := r.timeout_minutes;
            cache_key := NULL;
            cache_state := NULL;
            IF r.cache_ttl IS NOT NULL THEN
                req := reactor.render_cache_request(r.job_type, r.payload, r.input_field, r.type_defaults, p_fallback);
                IF req IS NOT NULL THEN
                    cache_key := encode(sha256(convert_to(req::text, 'UTF8')), 'hex');
                    cache_state := reactor.render_cache_claim(r.id, cache_key, req, r.cache_ttl);
                END IF;
            END IF;
            RETURN NEXT;
        END LOOP;
    END IF;
END
$$;

INSERT INTO reactor.schema_migrations (version, name) VALUES (14, 'fleet');
