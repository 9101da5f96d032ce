-- 0018_lean_cycle: what the reactor's cycle pays for every job, cut where it bought nothing.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0018_lean_cycle.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 17` (sql/rollback/0018_lean_cycle.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- A lone claim (one job inserted, picked up by an idle reactor) cost 0.13 ms more database time at
-- 0017 than before issue 18 (0006), and so did the outcome that ends the job: bench/README.md, "Issue
-- 18", the quiet figures. Not one statement holds it: each statement that writes reactor.jobs pays
-- a fixed cost before its first row (PostgreSQL 15 reads each CHECK expression from its stored text
-- once per statement, runs the row triggers, opens the 14 indexes), and 0007-0017 added statements.
-- Measured per statement on this machine (bench/README.md, "0018"), what this migration removes:
--
--   1. The eight CHECK constraints of reactor.jobs are one, through reactor.jobs_row_check(): the same
--      conditions, the same messages (each names its field, SQLSTATE 23514, the constraint named as
--      before in the error's constraint field), read once per session instead of parsed from about
--      6 KB of stored node text at every INSERT and UPDATE. Each of the cycle's UPDATEs saves about
--      30 us; a statement of many rows pays one function call a row more (an INSERT of 10,000 rows:
--      378-387 ms against 356-377 at 0017, about 2 us a row).
--   2. jobs_before_write no longer runs for the cycle's own two UPDATEs (claim and outcome): run_cycle()
--      sets what the trigger would set (updated_at, started_at, completed_at, locked_by,
--      lease_expires_at), and marks those two statements with reactor.stamped, which the UPDATE
--      trigger's WHEN clause reads. The CHECK above still checks every value they write. Every other
--      writer (INSERTs, the sweep, cancels, the runbook, SQL by hand) goes through the trigger as before.
--   3. The claim is one statement a priority rank, as claim_jobs() of 0006 was: the candidates from
--      each renderer's cursor, the UPDATE that takes them and their events, numbered on from the
--      totals in claim order; it was a statement that chose the candidates, then one that took them.
--      The read that moves the cursors past what the claim took runs after it (the jobs it took are
--      processing by then). The UPDATE returns the columns the claim uses, not the whole row.
--   4. A lone claim takes the claims' lock and the journal lock in one statement and reads the
--      newest totals itself (as journal_newest() does, without the function call); the actor is read
--      from reactor.actor first; the totals row and the NOTIFY are one statement.
--
-- Same locks in the same order, same events, seqs, totals, cursors and rows returned as 0017
-- (tests/integration/test_run_cycle.py, test_totals_concurrency.py); run_cycle() below is 0017's
-- with those changes, restated whole.

-- 1. One CHECK for the columns the eight checked. It returns true or raises with the old
--    constraint's name and message; NULLs pass, as they did (NOT NULL is separate).
CREATE FUNCTION reactor.jobs_row_check(p_priority text, p_status text, p_payload jsonb, p_result jsonb,
                                       p_retry_count integer, p_max_retries integer, p_error_category text,
                                       p_job_no bigint)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    bad text;
    col text;
    got text;
BEGIN
    IF p_priority NOT IN ('high', 'medium', 'low') THEN
        bad := 'jobs.priority must be high, medium or low'; col := 'priority'; got := quote_literal(p_priority);
    ELSIF p_status NOT IN ('queued', 'processing', 'completed', 'failed', 'cancelled') THEN
        bad := 'jobs.status must be queued, processing, completed, failed or cancelled'; col := 'status';
        got := quote_literal(p_status);
    ELSIF jsonb_typeof(p_payload) <> 'object' THEN
        bad := 'jobs.payload must be a JSON object'; col := 'payload'; got := jsonb_typeof(p_payload);
    ELSIF jsonb_typeof(p_result) <> 'object' THEN
        bad := 'jobs.result must be a JSON object'; col := 'result'; got := jsonb_typeof(p_result);
    ELSIF p_retry_count < 0 THEN
        bad := 'jobs.retry_count must be 0 or more'; col := 'retry_count'; got := p_retry_count::text;
    ELSIF p_max_retries < 0 THEN
        bad := 'jobs.max_retries must be 0 or more'; col := 'max_retries'; got := p_max_retries::text;
    ELSIF p_error_category NOT IN ('TIMEOUT', 'API_ERROR', 'INVALID_INPUT', 'NOT_FOUND', 'UNKNOWN') THEN
        bad := 'jobs.error_category is not a known category'; col := 'error_category';
        got := quote_literal(p_error_category);
    ELSIF p_job_no < 1 OR p_job_no > 72057594037927935 THEN
        bad := 'jobs.job_no must be between 1 and 2^56 - 1 (queue keys hold 7 bytes of it)'; col := 'job_no';
        got := p_job_no::text;
    ELSE
        RETURN true;
    END IF;
    RAISE EXCEPTION 'new row for relation "jobs" violates check constraint "%"', bad
        USING ERRCODE = 'check_violation', DETAIL = format('%s is %s', col, got), SCHEMA = 'reactor',
              TABLE = 'jobs', COLUMN = col, CONSTRAINT = bad;
END
$$;

ALTER TABLE reactor.jobs
    DROP CONSTRAINT "jobs.priority must be high, medium or low",
    DROP CONSTRAINT "jobs.status must be queued, processing, completed, failed or cancelled",
    DROP CONSTRAINT "jobs.payload must be a JSON object",
    DROP CONSTRAINT "jobs.result must be a JSON object",
    DROP CONSTRAINT "jobs.retry_count must be 0 or more",
    DROP CONSTRAINT "jobs.max_retries must be 0 or more",
    DROP CONSTRAINT "jobs.error_category is not a known category",
    DROP CONSTRAINT "jobs.job_no must be between 1 and 2^56 - 1 (queue keys hold 7 bytes of it)",
    ADD CONSTRAINT "jobs row must pass reactor.jobs_row_check()"
        CHECK (reactor.jobs_row_check(priority, status, payload, result, retry_count, max_retries,
                                      error_category, job_no));

-- 2. jobs_before_write for every INSERT, and for every UPDATE but the cycle's own two
DROP TRIGGER jobs_before_write ON reactor.jobs;
CREATE TRIGGER jobs_before_write BEFORE INSERT ON reactor.jobs
    FOR EACH ROW EXECUTE FUNCTION reactor.jobs_before_write();
CREATE TRIGGER jobs_before_write_update BEFORE UPDATE ON reactor.jobs
    FOR EACH ROW WHEN (current_setting('reactor.stamped', true) IS DISTINCT FROM pg_current_xact_id()::text)
    EXECUTE FUNCTION reactor.jobs_before_write();

-- 3, 4. run_cycle(): 0017's, with the changes above
CREATE OR REPLACE FUNCTION reactor.run_cycle(p_batch jsonb, p_reactor text, p_max integer, p_lease interval,
                                  p_clock timestamptz DEFAULT now(), p_fallback jsonb DEFAULT '{}')
RETURNS TABLE (written boolean, id uuid, job_type text, priority text, payload jsonb, user_id uuid,
               renderer text, retry_count integer, max_retries integer, attempt integer,
               created_at timestamptz, input_field text, type_defaults jsonb, timeout_minutes integer,
               cache_key text, cache_state text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    batch_ids  uuid[];
    o          record;               -- the outcomes written, counted; the newest totals when locked
    tot        reactor.totals;       -- the totals this transaction starts from (after the lock)
    lim        record;
    skip       record;
    c          record;
    req        jsonb;
    -- what this transaction changes, for its one totals row
    n_out      integer := 0;
    n_requeued integer := 0;
    d_queued   bigint := 0;
    d_proc     bigint := 0;
    d_manim    bigint := 0;
    d_done     bigint := 0;
    d_failed   bigint := 0;
    d_cancel   bigint := 0;
    d_high     bigint := 0;
    d_medium   bigint := 0;
    d_low      bigint := 0;
    cur_at     timestamptz[];
    cur_no     bigint[];
    free_total integer;
    free_manim integer;
    due        timestamptz;
    r          integer;
    m          integer;
    k          integer;
    n_claim    integer := 0;
    v_more     boolean := false;
    one        jsonb;                -- the one event of a transaction that has one
    v_actor    text;
    msg        jsonb;
    notified   text;
    stamping   boolean := false;     -- reactor.journal and reactor.stamped set for the claim
    r_n        integer;              -- jobs claimed at this rank, and of them manim
    r_manim    integer;
    last_m_at  timestamptz;          -- the last job claimed at this rank, manim and other
    last_m_no  bigint;
    last_o_at  timestamptz;
    last_o_no  bigint;
    has_batch  boolean := jsonb_array_length(p_batch) > 0;
BEGIN
    IF p_max > 0 AND NOT has_batch THEN
        -- a lone claim: the claims' lock, then the journal lock (nothing to wait for in between)
        PERFORM pg_advisory_xact_lock(7240513002), pg_advisory_xact_lock(7240513004);
    ELSIF p_max > 0 THEN
        PERFORM pg_advisory_xact_lock(7240513002);  -- before the journal lock: one lock order
    END IF;
    v_actor := coalesce(nullif(current_setting('reactor.actor', true), ''), reactor.current_actor());
    cache_key := NULL;
    cache_state := NULL;

    -- 1. The outcomes, as finish_and_claim() writes them: jobs by id, only the attempt still held.
    --    The journal lock is taken after the UPDATE has its row locks (journal_newest() is called
    --    only once f is read), so that a writer holding one of these rows and waiting for the
    --    journal lock at its commit cannot wait for us.
    IF has_batch THEN
        PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true),
                set_config('reactor.stamped', pg_current_xact_id()::text, true);
        batch_ids := ARRAY(SELECT (x->>'id')::uuid FROM jsonb_array_elements(p_batch) x);
        WITH f AS (
            UPDATE reactor.jobs j
               SET status = f.status,
                   result = f.result,
                   retry_count = f.retry_count,
                   run_after = CASE WHEN f.status = 'queued' THEN now() + make_interval(secs => f.delay_s)
                                    ELSE j.run_after END,
                   error_category = f.error_category,
                   error_message = f.error_message,
                   error_details = f.error_details,
                   -- what jobs_before_write does to a job that leaves processing (it skips this
                   -- statement: reactor.stamped); status, result, retry_count and error_category are
                   -- checked by the table's CHECK (reactor.jobs_row_check)
                   updated_at = now(),
                   locked_by = CASE WHEN f.status = 'processing' THEN j.locked_by END,
                   lease_expires_at = CASE WHEN f.status = 'processing' THEN j.lease_expires_at END,
                   completed_at = CASE WHEN f.status = 'processing' THEN j.completed_at
                                       WHEN f.status = 'queued' THEN NULL ELSE now() END
              FROM jsonb_to_recordset(p_batch) AS f(id uuid, attempt integer, status text, result jsonb,
                   retry_count integer, delay_s double precision, error_category text, error_message text,
                   error_details jsonb)
             WHERE j.id = ANY(batch_ids) AND j.id = f.id AND j.attempt = f.attempt AND j.status = 'processing'
               AND j.locked_by = p_reactor
            RETURNING j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count,
                      j.error_category, j.job_no, j.created_at, j.priority_rank
        ), n AS (
            SELECT count(*) AS n,
                   count(*) FILTER (WHERE f.renderer = 'manim') AS manim,
                   count(*) FILTER (WHERE f.status = 'queued') AS queued,
                   count(*) FILTER (WHERE f.status = 'completed') AS completed,
                   count(*) FILTER (WHERE f.status = 'failed') AS failed,
                   count(*) FILTER (WHERE f.status = 'cancelled') AS cancelled,
                   count(*) FILTER (WHERE f.status = 'queued' AND f.priority = 'high') AS high,
                   count(*) FILTER (WHERE f.status = 'queued' AND f.priority = 'medium') AS medium,
                   count(*) FILTER (WHERE f.status = 'queued' AND f.priority = 'low') AS low,
                   array_agg(f.id) AS ids,
                   -- retried jobs are queued again at their old place: the cursors must not pass them
                   array_agg(f.renderer ORDER BY f.job_no) FILTER (WHERE f.status = 'queued') AS r_renderer,
                   array_agg(f.priority_rank ORDER BY f.job_no) FILTER (WHERE f.status = 'queued') AS r_rank,
                   array_agg(f.created_at ORDER BY f.job_no) FILTER (WHERE f.status = 'queued') AS r_at,
                   array_agg(f.job_no ORDER BY f.job_no) FILTER (WHERE f.status = 'queued') AS r_no
              FROM f
        ), b AS (
            SELECT t AS bt FROM n, LATERAL reactor.journal_newest() t WHERE n.n > 0
        ), ev AS (
            INSERT INTO reactor.events AS e (seq, job_id, kind, status, old_status, priority, job_type,
                                             renderer, user_id, retry_count, error_category, actor)
            SELECT (b.bt).seq + row_number() OVER (ORDER BY f.job_no),
                   f.id, CASE WHEN f.status = 'queued' THEN 'retrying' ELSE f.status END, f.status,
                   'processing', f.priority, f.job_type, f.renderer, f.user_id, f.retry_count,
                   f.error_category, v_actor
              FROM f, b
            RETURNING e.seq, e.job_id, e.kind, e.status, e.priority, e.job_type, e.renderer, e.user_id
        )
        SELECT n.*, b.bt,
               (SELECT jsonb_build_object('seq', ev.seq, 'n', 1, 'kind', ev.kind, 'id', ev.job_id,
                                          'status', ev.status, 'old_status', 'processing',
                                          'priority', ev.priority, 'job_type', ev.job_type,
                                          'renderer', ev.renderer, 'user_id', ev.user_id, 'actor', v_actor)
                  FROM ev WHERE n.n = 1) AS one
          INTO o
          FROM n LEFT JOIN b ON true;
        PERFORM set_config('reactor.journal', '', true), set_config('reactor.stamped', '', true);
        IF o.n > 0 THEN
            tot := o.bt;
            n_out := o.n;
            d_queued := o.queued;
            n_requeued := o.queued;
            d_proc := -o.n;
            d_manim := -o.manim;
            d_done := o.completed;
            d_failed := o.failed;
            d_cancel := o.cancelled;
            d_high := o.high;
            d_medium := o.medium;
            d_low := o.low;
            one := o.one;
            cur_at := tot.cursor_at;
            cur_no := tot.cursor_no;
            IF o.queued > 0 THEN
                SELECT l.at, l.no INTO cur_at, cur_no
                  FROM reactor.cursor_keys(o.r_renderer, o.r_rank, o.r_at, o.r_no) ck,
                       LATERAL reactor.cursor_lower(tot.cursor_at, tot.cursor_no, ck.at, ck.no) l;
            END IF;
            FOR k IN 1..n_out LOOP
                written := true; id := o.ids[k]; job_type := NULL; priority := NULL; payload := NULL;
                user_id := NULL; renderer := NULL; retry_count := NULL; max_retries := NULL; attempt := NULL;
                created_at := NULL; input_field := NULL; type_defaults := NULL; timeout_minutes := NULL;
                RETURN NEXT;
            END LOOP;
            -- 2. The render cache: the renders among the outcomes settle their entry and its waiters
            --    (staged writes, journalled at commit), before the claim, as finish_settle_and_claim()
            IF jsonb_path_exists(p_batch, '$[*] ? (exists(@.cache_key) && @.cache_key != null)') THEN
                PERFORM reactor.render_cache_settle(p_batch, o.ids);
            END IF;
        END IF;
    END IF;

    -- 3. The claim, as claim_jobs() (0015) makes it but one statement a rank, from the totals above
    --    with the outcomes applied
    IF p_max > 0 THEN
        IF n_out = 0 THEN
            -- no outcome took the journal lock: take it before this claim reads anything, so that
            -- no transaction can commit a job below the cursors between what this claim reads and
            -- the cursors it writes
            IF has_batch THEN
                PERFORM pg_advisory_xact_lock(7240513004);  -- as journal_newest(); a lone claim took it above
            END IF;
            -- read in a snapshot taken after the journal lock, as journal_newest() reads
            SELECT * INTO tot FROM reactor.totals t ORDER BY t.id DESC LIMIT 1;
            cur_at := tot.cursor_at;
            cur_no := tot.cursor_no;
        END IF;
        SELECT cfg.max_concurrent_renders = 0 AS paused,
               CASE WHEN p.is_peak AND cfg.max_concurrent_renders > 0
                    THEN greatest(1, floor(cfg.max_concurrent_renders * cfg.peak_worker_multiplier))::integer
                    ELSE cfg.max_concurrent_renders END AS max_renders,
               CASE WHEN p.is_peak AND cfg.max_manim_renders > 0
                    THEN greatest(1, floor(cfg.max_manim_renders * cfg.peak_worker_multiplier))::integer
                    ELSE cfg.max_manim_renders END AS max_manim,
               cfg.job_timeout_minutes
          INTO lim
          FROM public.job_queue_config cfg,
               LATERAL (SELECT (p_clock AT TIME ZONE cfg.timezone)::time AS t) lt,
               LATERAL (SELECT coalesce(CASE
                    WHEN cfg.peak_hour_start IS NULL OR cfg.peak_hour_start = cfg.peak_hour_end THEN false
                    WHEN cfg.peak_hour_start < cfg.peak_hour_end
                        THEN lt.t >= cfg.peak_hour_start AND lt.t < cfg.peak_hour_end
                    ELSE lt.t >= cfg.peak_hour_start OR lt.t < cfg.peak_hour_end
               END, false) AS is_peak) p;
        free_total := CASE WHEN lim.paused THEN 0
                           ELSE least(lim.max_renders - (tot.processing + d_proc), p_max) END;
        free_manim := greatest(least(lim.max_manim - (tot.processing_manim + d_manim), free_total), 0);
        due := clock_timestamp();
        FOR r IN 0..2 LOOP
            EXIT WHEN free_total <= 0;
            CONTINUE WHEN (ARRAY[tot.queued_high + d_high, tot.queued_medium + d_medium,
                                 tot.queued_low + d_low])[r + 1] <= 0;
            m := 1 + r;
            k := 4 + r;
            r_n := 0;
            r_manim := 0;
            IF NOT stamping THEN
                -- the outcomes' writes are done (and journalled): the UPDATEs of jobs from here to
                -- the end of the loop are this claim's
                PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true),
                        set_config('reactor.stamped', pg_current_xact_id()::text, true);
                stamping := true;
            END IF;
            -- one statement a rank: the candidates (each renderer from its cursor), the UPDATE that
            -- takes them and their events, numbered on from the totals in claim order
            FOR c IN
                WITH cand_manim AS (
                    SELECT q.id, q.created_at, q.job_no FROM reactor.jobs q
                     WHERE q.status = 'queued' AND q.renderer = 'manim' AND q.priority_rank = r
                       AND (q.created_at, q.job_no) >= (cur_at[m], cur_no[m]) AND q.run_after <= due
                     ORDER BY q.created_at, q.job_no
                     LIMIT least(free_manim, free_total) FOR UPDATE SKIP LOCKED
                ), cand_other AS (
                    SELECT q.id, q.created_at, q.job_no FROM reactor.jobs q
                     WHERE q.status = 'queued' AND q.renderer <> 'manim' AND q.priority_rank = r
                       AND (q.created_at, q.job_no) >= (cur_at[k], cur_no[k]) AND q.run_after <= due
                     ORDER BY q.created_at, q.job_no
                     LIMIT free_total FOR UPDATE SKIP LOCKED
                ), pick AS (
                    SELECT cm.id, row_number() OVER (ORDER BY cm.created_at, cm.job_no) AS pos
                      FROM (SELECT * FROM cand_manim UNION ALL SELECT * FROM cand_other) cm
                     ORDER BY cm.created_at, cm.job_no LIMIT free_total
                ), upd AS (
                    UPDATE reactor.jobs j
                       SET status = 'processing', attempt = j.attempt + 1, locked_by = p_reactor,
                           lease_expires_at = now() + p_lease,
                           -- what jobs_before_write does to a job that starts (it skips this statement)
                           updated_at = now(), started_at = now(), completed_at = NULL
                      FROM pick
                     WHERE j.id = pick.id
                    RETURNING j.id, j.job_type, j.priority, j.payload, j.user_id, j.renderer, j.retry_count,
                              j.max_retries, j.attempt, j.created_at, j.job_no, j.error_category,
                              tot.seq + n_out + n_claim + pick.pos AS seq
                ), ev AS (
                    INSERT INTO reactor.events AS e (seq, job_id, kind, status, old_status, priority, job_type,
                                                     renderer, user_id, retry_count, error_category, actor)
                    SELECT upd.seq, upd.id, 'started', 'processing', 'queued', upd.priority, upd.job_type,
                           upd.renderer, upd.user_id, upd.retry_count, upd.error_category, v_actor
                      FROM upd
                )
                SELECT upd.id, upd.job_type, upd.priority, upd.payload, upd.user_id, upd.renderer,
                       upd.retry_count, upd.max_retries, upd.attempt, upd.created_at, upd.job_no,
                       t.input_field, t.defaults, t.cache_ttl, upd.seq
                  FROM upd JOIN public.job_types t ON t.name = upd.job_type
                 ORDER BY upd.seq
            LOOP
                n_claim := n_claim + 1;
                r_n := r_n + 1;
                d_queued := d_queued - 1;
                d_proc := d_proc + 1;
                IF c.renderer = 'manim' THEN
                    d_manim := d_manim + 1;
                    r_manim := r_manim + 1;
                    last_m_at := c.created_at;
                    last_m_no := c.job_no;
                ELSE
                    last_o_at := c.created_at;
                    last_o_no := c.job_no;
                END IF;
                CASE c.priority
                    WHEN 'high' THEN d_high := d_high - 1;
                    WHEN 'medium' THEN d_medium := d_medium - 1;
                    ELSE d_low := d_low - 1;
                END CASE;
                IF n_out = 0 AND n_claim = 1 THEN
                    one := jsonb_build_object('seq', c.seq, 'n', 1, 'kind', 'started', 'id', c.id,
                                              'status', 'processing', 'old_status', 'queued',
                                              'priority', c.priority, 'job_type', c.job_type,
                                              'renderer', c.renderer, 'user_id', c.user_id, 'actor', v_actor);
                END IF;
                written := false; id := c.id; job_type := c.job_type; priority := c.priority;
                payload := c.payload; user_id := c.user_id; renderer := c.renderer;
                retry_count := c.retry_count; max_retries := c.max_retries; attempt := c.attempt;
                created_at := c.created_at; input_field := c.input_field; type_defaults := c.defaults;
                timeout_minutes := lim.job_timeout_minutes;
                cache_key := NULL;
                cache_state := NULL;
                IF c.cache_ttl IS NOT NULL THEN
                    req := reactor.render_cache_request(c.job_type, c.payload, c.input_field, c.defaults, p_fallback);
                    IF req IS NOT NULL THEN
                        cache_key := encode(sha256(convert_to(req::text, 'UTF8')), 'hex');
                        cache_state := reactor.render_cache_claim(c.id, cache_key, req, c.cache_ttl);
                    END IF;
                END IF;
                RETURN NEXT;
            END LOOP;
            -- each cursor moves to the first job this claim passed without taking (another writer
            -- held it, or it is not due yet), else to the last one it took. The jobs it took are
            -- processing now: what is still queued in between was passed over.
            IF r_manim > 0 THEN
                SELECT q.created_at, q.job_no INTO skip FROM reactor.jobs q
                 WHERE q.status = 'queued' AND q.renderer = 'manim'
                   AND (q.priority_rank, q.created_at, q.job_no) >= (r, cur_at[m], cur_no[m])
                   AND (q.priority_rank, q.created_at, q.job_no) <= (r, last_m_at, last_m_no)
                 ORDER BY q.priority_rank, q.created_at, q.job_no LIMIT 1;
                cur_at[m] := CASE WHEN FOUND THEN skip.created_at ELSE last_m_at END;
                cur_no[m] := CASE WHEN FOUND THEN skip.job_no ELSE last_m_no END;
            END IF;
            IF r_n - r_manim > 0 THEN
                SELECT q.created_at, q.job_no INTO skip FROM reactor.jobs q
                 WHERE q.status = 'queued' AND q.renderer <> 'manim'
                   AND (q.priority_rank, q.created_at, q.job_no) >= (r, cur_at[k], cur_no[k])
                   AND (q.priority_rank, q.created_at, q.job_no) <= (r, last_o_at, last_o_no)
                 ORDER BY q.priority_rank, q.created_at, q.job_no LIMIT 1;
                cur_at[k] := CASE WHEN FOUND THEN skip.created_at ELSE last_o_at END;
                cur_no[k] := CASE WHEN FOUND THEN skip.job_no ELSE last_o_no END;
            END IF;
            free_total := free_total - r_n;
            free_manim := free_manim - r_manim;
        END LOOP;
        IF stamping THEN
            PERFORM set_config('reactor.journal', '', true), set_config('reactor.stamped', '', true);
        END IF;
        -- a claim that took fewer than p_max stopped at a limit or at the end of what is due: nobody
        -- else can take more now. One that took p_max while the fleet has room left says so ("more"),
        -- so that the others claim the rest.
        v_more := n_claim >= p_max AND lim.max_renders - (tot.processing - n_out) > p_max;
    END IF;

    -- 4. One totals row and one NOTIFY for everything above
    IF n_out + n_claim = 0 THEN
        RETURN;
    END IF;
    IF n_out + n_claim = 1 THEN
        msg := one;
    ELSE
        -- q: jobs that became queued, f: jobs that left processing, c: cancellations
        msg := jsonb_build_object('seq', tot.seq + n_out + n_claim, 'n', n_out + n_claim, 'q', n_requeued,
                                  'f', n_out, 'c', d_cancel, 'actor', v_actor);
    END IF;
    IF n_out > 0 AND p_max > 0 THEN
        msg := msg || '{"claiming": true}';
    END IF;
    IF v_more THEN
        msg := msg || '{"more": true}';
    END IF;
    -- outcomes that left nothing for anyone else (all finished, their room taken again by this
    -- claim, no "more"): reactor_log, which only feeds with clients follow. Anything else may give
    -- another reactor work: reactor_events
    WITH appended AS (
        INSERT INTO reactor.totals (id, seq, queued, processing, processing_manim, completed, failed, cancelled,
                                    queued_high, queued_medium, queued_low, cursor_at, cursor_no)
        VALUES (tot.id + 1, tot.seq + n_out + n_claim, tot.queued + d_queued, tot.processing + d_proc,
                tot.processing_manim + d_manim, tot.completed + d_done, tot.failed + d_failed,
                tot.cancelled + d_cancel, tot.queued_high + d_high, tot.queued_medium + d_medium,
                tot.queued_low + d_low, cur_at, cur_no)
    )
    SELECT pg_notify(CASE WHEN n_out > 0 AND p_max > 0 AND NOT v_more AND n_requeued = 0 AND d_cancel = 0
                          THEN 'reactor_log' ELSE 'reactor_events' END, msg::text)::text
      INTO notified;  -- the totals row and the NOTIFY in one statement
END
$$;

INSERT INTO reactor.schema_migrations (version, name) VALUES (18, 'lean_cycle');
