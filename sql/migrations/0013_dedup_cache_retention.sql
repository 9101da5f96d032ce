-- 0013_dedup_cache_retention: idempotent inserts, a render cache, retention of finished jobs, and
-- positions that leave out jobs not yet due.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0013_dedup_cache_retention.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 12` (sql/rollback/0013_dedup_cache_retention.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- Four parts, each in its own section below (README, "Deduplication, the render cache and
-- retention"):
--
-- 1. Deduplication. jobs.idempotency_key (text, NULL: none). An INSERT whose key equals that of a
--    job still queued or processing creates nothing, and its RETURNING gives that job. public.jobs
--    stays an automatically updatable view (a multi-row INSERT is still one statement, its
--    statement triggers fire once, column privileges and row level security apply as before, and
--    queue_position is computed only when RETURNING asks for it). A BEFORE INSERT trigger, fired
--    only for rows that carry a key, takes a transaction-level advisory lock on the key (so
--    inserts of one key queue up, READ COMMITTED each sees what the one before committed), looks
--    the live job up by key, and if there is one turns the row into a stand-in: a copy of that job
--    (same id, same values), which is what RETURNING reads. An AFTER INSERT row trigger deletes
--    the stand-in before the statement ends, so nothing is left: the primary key is DEFERRABLE
--    INITIALLY IMMEDIATE, checked at the end of the statement, after the stand-in is gone (its
--    trigger's name sorts before the key's internal recheck trigger, PK_ConstraintTrigger_<oid>,
--    because row triggers fire in name order). The journal skips stand-ins: no event, no NOTIFY,
--    no change to the totals. A partial unique index on the key of live jobs is the backstop for
--    transactions whose snapshot cannot see the job committed before them (REPEATABLE READ,
--    SERIALIZABLE): they get a unique_violation, never a second job.
--
-- 2. Render cache. job_types.cache_ttl (NULL: off; topic_short and daily_ca 24 hours). The claim
--    (finish_settle_and_claim) resolves each claimed job's request (job type, input, style, length,
--    voice; reactor.render_cache_request), hashes it (cache_key) and, under an advisory lock on the
--    key, looks at its entry in reactor.render_cache (render_cache_claim): none usable, and this job
--    renders with no further round trip (the entry now names it); else the reactor asks
--    reactor.render_cache_take() before rendering, which decides under the lock:
--      * a completed entry younger than the TTL: the job completes at once with its result and
--        result.cached_from = the job that rendered it (no render call);
--      * an entry another live job is rendering: this job waits for it, queued with
--        jobs.cache_key set and run_after a while ahead (it holds no render slot); when the
--        renderer's outcome is written, in that same transaction, every waiter completes with
--        the result (or, if the render failed, is due at once to render itself);
--        should nothing come, run_after passes, it is claimed again and asks again;
--      * else this job renders, and the entry names it.
--    Every lookup is by key. payload.cache = false opts a job out.
--
-- 3. Retention. job_queue_config.job_retention (default 30 days): completed, failed and cancelled
--    jobs whose completed_at is older are deleted with their events by reactor.prune_jobs(), in
--    batches (the sweep runs a few per sweep, each its own short transaction). They are nobody's
--    event: the totals drop by what was deleted and seq does not move.
--
-- 4. Positions of due jobs: a queued job still waiting for its run_after no longer counts ahead of
--    the due jobs of its queue (0011 already gave it no position of its own).
--
-- With 0011_schedules: jobs.idempotency_key is 0011's column (a schedule's slot jobs carry their
-- key, and so are deduplicated like any job), reactor.schedule_job() names its ON CONFLICT arbiter
-- (the primary key is deferrable now, and ON CONFLICT refuses a deferrable arbiter), and the view
-- public.jobs keeps every column 0011 gave it.
--
-- With 0012_commit_path: nothing here replaces reactor.sequence_commit() (0012's read of the jobs a
-- commit queued, by key behind an OFFSET 0 fence, stays as it is), and no object 0012 made.

-- 1. Deduplication --------------------------------------------------------------------------------

-- jobs.idempotency_key came with 0011_schedules (the key of a schedule's slot), and the view shows it
ALTER TABLE reactor.jobs ADD COLUMN idempotent_standin boolean;
COMMENT ON COLUMN reactor.jobs.idempotent_standin IS
    'true only on the copy of a live job that a deduplicated INSERT returns; deleted before its statement ends';

ALTER TABLE reactor.jobs DROP CONSTRAINT jobs_pkey,
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id) DEFERRABLE INITIALLY IMMEDIATE;

CREATE UNIQUE INDEX jobs_idempotency_idx ON reactor.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'processing') AND idempotent_standin IS NOT TRUE;

-- Fired last of the BEFORE INSERT triggers (name order), after the row passed every check.
CREATE FUNCTION reactor.jobs_idempotent_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    live reactor.jobs;
BEGIN
    NEW.idempotent_standin := NULL;
    -- two-int advisory locks never meet the reactor's bigint ones
    PERFORM pg_advisory_xact_lock(7240513, hashtext(NEW.idempotency_key));
    SELECT j.* INTO live FROM reactor.jobs j
     WHERE j.idempotency_key = NEW.idempotency_key AND j.status IN ('queued', 'processing')
       AND j.idempotent_standin IS NOT TRUE;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    NEW := live;
    NEW.idempotent_standin := true;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION reactor.jobs_idempotent_insert() IS
    'An INSERT whose idempotency_key a queued or processing job holds becomes a stand-in: a copy of that job, '
    'returned by RETURNING and deleted before the statement ends.';

CREATE TRIGGER jobs_submit_once BEFORE INSERT ON reactor.jobs
    FOR EACH ROW WHEN (NEW.idempotency_key IS NOT NULL)
    EXECUTE FUNCTION reactor.jobs_idempotent_insert();

-- SECURITY DEFINER: whoever may insert a job may drop its own stand-in (Supabase's users may not delete).
CREATE FUNCTION reactor.jobs_drop_standin() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM reactor.jobs j WHERE j.id = NEW.id AND j.idempotent_standin;
    RETURN NULL;
END
$$;

-- The name must sort before PK_ConstraintTrigger_<oid> (row triggers fire in name order): the
-- primary key's recheck must find the stand-in gone.
CREATE TRIGGER "Jobs_drop_idempotent_standin" AFTER INSERT ON reactor.jobs
    FOR EACH ROW WHEN (NEW.idempotent_standin)
    EXECUTE FUNCTION reactor.jobs_drop_standin();

-- The staged journal of 0001, skipping stand-ins.
CREATE OR REPLACE FUNCTION reactor.stage_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reactor.event_stage
        (job_id, kind, status, priority, job_type, renderer, user_id, retry_count, error_category, actor)
    SELECT n.id, 'inserted', n.status, n.priority, n.job_type, n.renderer, n.user_id, n.retry_count,
           n.error_category, reactor.current_actor()
    FROM new_rows n WHERE n.idempotent_standin IS NOT TRUE ORDER BY n.job_no;
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
    FROM old_rows o WHERE o.idempotent_standin IS NOT TRUE ORDER BY o.job_no;
    IF FOUND THEN
        INSERT INTO reactor.pending_commits VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

-- A schedule's slot job (0011) names its arbiter: ON CONFLICT without one takes every unique index
-- as an arbiter, and a deferrable one (the primary key, above) is refused as such. The slot's
-- index is the one that says "this slot's job exists"; while that job is live, the stand-in the
-- trigger makes of it conflicts there too, so nothing is inserted and NULL is returned as before.
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
    ON CONFLICT (schedule_name, idempotency_key) WHERE schedule_name IS NOT NULL DO NOTHING
    RETURNING id INTO job;
    RETURN job;
END
$$;

-- 2. Render cache ---------------------------------------------------------------------------------

ALTER TABLE public.job_types ADD COLUMN cache_ttl interval,
    ADD CONSTRAINT "job_types.cache_ttl must be NULL (no cache) or longer than 0"
        CHECK (cache_ttl IS NULL OR cache_ttl > interval '0');
COMMENT ON COLUMN public.job_types.cache_ttl IS
    'How long a rendered video serves identical requests (job type, input, style, length, voice); NULL: no cache.';
UPDATE public.job_types SET cache_ttl = interval '24 hours' WHERE name IN ('topic_short', 'daily_ca');

ALTER TABLE reactor.jobs ADD COLUMN cache_key text;
COMMENT ON COLUMN reactor.jobs.cache_key IS
    'Set while the job waits for another job that renders the same request (reactor.render_cache.key).';
CREATE INDEX jobs_cache_wait_idx ON reactor.jobs (cache_key) WHERE status = 'queued' AND cache_key IS NOT NULL;

CREATE TABLE reactor.render_cache (
    key          text PRIMARY KEY,              -- sha256 (hex) of the resolved request
    request      jsonb NOT NULL,                -- job_type, input, style, length, voice
    job_id       uuid NOT NULL,                 -- the job that rendered it, or renders it now
    status       text NOT NULL,                 -- rendering, completed
    result       jsonb,                         -- the renderer's result, once completed
    started_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    CONSTRAINT "render_cache.status must be rendering or completed" CHECK (status IN ('rendering', 'completed'))
);
COMMENT ON TABLE reactor.render_cache IS
    'One row per resolved render request: which job renders (or rendered) it and its result. Jobs of a type '
    'with cache_ttl complete from a completed row younger than the TTL (result.cached_from), or wait for a '
    'rendering one.';
CREATE INDEX render_cache_job_idx ON reactor.render_cache (job_id);

-- What the reactor does with a job it holds before rendering it (see above). p_wait: how long a
-- waiter stays parked without news. Returns render, hit (with the source job and its result) or wait
-- (the job is queued again, not ours any more).
CREATE FUNCTION reactor.render_cache_take(p_job uuid, p_attempt integer, p_reactor text, p_key text,
                                          p_request jsonb, p_wait interval,
                                          OUT decision text, OUT source uuid, OUT result jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    ttl   interval;
    entry reactor.render_cache;
BEGIN
    decision := 'render';
    SELECT t.cache_ttl INTO ttl
      FROM reactor.jobs j JOIN public.job_types t ON t.name = j.job_type
     WHERE j.id = p_job AND j.attempt = p_attempt AND j.status = 'processing' AND j.locked_by = p_reactor;
    IF ttl IS NULL THEN
        RETURN;  -- no cache for its type (or the job is no longer ours: its outcome will not be written)
    END IF;
    -- the journal lock first, as the outcomes that settle a key take it (finish_settle_and_claim: the
    -- journal, then the key): parking the job below is journalled at commit, and holding the key while
    -- that commit waits for an outcome that waits for the key would deadlock
    PERFORM pg_advisory_xact_lock(7240513004);
    PERFORM pg_advisory_xact_lock(7240514, hashtext(p_key));
    SELECT c.* INTO entry FROM reactor.render_cache c WHERE c.key = p_key;
    IF FOUND AND entry.status = 'completed' AND entry.completed_at > now() - ttl
       AND jsonb_typeof(entry.result) = 'object' AND entry.result ? 'video_url' THEN
        decision := 'hit';
        source := entry.job_id;
        result := entry.result || jsonb_build_object('cached_from', entry.job_id);
        RETURN;
    END IF;
    IF FOUND AND entry.status = 'rendering' AND entry.job_id <> p_job AND EXISTS (
            SELECT 1 FROM reactor.jobs r WHERE r.id = entry.job_id AND r.status IN ('queued', 'processing')) THEN
        UPDATE reactor.jobs j
           SET status = 'queued', run_after = now() + p_wait, cache_key = p_key, error_category = NULL,
               error_message = 'waiting for job ' || entry.job_id || ', which renders the same request',
               error_details = NULL
         WHERE j.id = p_job AND j.attempt = p_attempt AND j.status = 'processing' AND j.locked_by = p_reactor;
        decision := 'wait';
        source := entry.job_id;
        RETURN;
    END IF;
    INSERT INTO reactor.render_cache AS c (key, request, job_id, status)
    VALUES (p_key, p_request, p_job, 'rendering')
    ON CONFLICT (key) DO UPDATE
        SET request = EXCLUDED.request, job_id = EXCLUDED.job_id, status = 'rendering', result = NULL,
            started_at = now(), completed_at = NULL;
END
$$;

-- After outcomes are written (same transaction): the renders among them settle their cache entry
-- and its waiters. p_batch: the outcomes (with cache_key); p_written: the ids actually written.
CREATE FUNCTION reactor.render_cache_settle(p_batch jsonb, p_written uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    o record;
BEGIN
    FOR o IN SELECT f.id, f.status, f.result, f.cache_key
               FROM jsonb_to_recordset(p_batch) AS f(id uuid, status text, result jsonb, cache_key text)
              WHERE f.cache_key IS NOT NULL AND f.id = ANY(p_written) AND f.status IN ('completed', 'failed')
              ORDER BY f.cache_key LOOP
        PERFORM pg_advisory_xact_lock(7240514, hashtext(o.cache_key));
        IF o.status = 'completed' THEN
            UPDATE reactor.render_cache c
               SET status = 'completed', result = o.result, completed_at = now()
             WHERE c.key = o.cache_key AND c.job_id = o.id AND c.status = 'rendering';
            IF FOUND THEN
                UPDATE reactor.jobs j
                   SET status = 'completed', result = o.result || jsonb_build_object('cached_from', o.id),
                       error_category = NULL, error_message = NULL, error_details = NULL
                 WHERE j.cache_key = o.cache_key AND j.status = 'queued';
            END IF;
        ELSE
            DELETE FROM reactor.render_cache c
             WHERE c.key = o.cache_key AND c.job_id = o.id AND c.status = 'rendering';
            IF FOUND THEN
                -- due now: one of them renders, the others wait for it
                UPDATE reactor.jobs j
                   SET run_after = now(), cache_key = NULL, error_message = NULL
                 WHERE j.cache_key = o.cache_key AND j.status = 'queued';
            END IF;
        END IF;
    END LOOP;
END
$$;

-- The request a claimed job would render, as the cache keys it, or NULL when the job does not use the
-- cache: payload.cache = false, or an input or option that is not text (the reactor fails such a job
-- without rendering). As reactor/core/policy.py build_request() resolves it: the input is
-- payload[input_field]; style, length and voice come from the payload, else the job type's
-- defaults, else p_fallback (the reactor's DEFAULT_RENDER_OPTIONS). Values are trimmed of fewer
-- characters than Python's str.strip(), so two jobs with one key always make one request (two
-- requests the reactor would make equal may get two keys: a render not saved, nothing worse).
CREATE FUNCTION reactor.render_cache_request(p_job_type text, p_payload jsonb, p_input_field text,
                                             p_defaults jsonb, p_fallback jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(p_payload) = 'object' AND jsonb_typeof(p_defaults) = 'object'
                     AND p_payload -> 'cache' IS DISTINCT FROM 'false'::jsonb
                     AND jsonb_typeof(p_payload -> p_input_field) = 'string'
                     AND jsonb_typeof(o.style) = 'string' AND jsonb_typeof(o.length) = 'string'
                     AND jsonb_typeof(o.voice) = 'string'
                THEN jsonb_build_object('job_type', p_job_type,
                                        'input', btrim(p_payload ->> p_input_field, E' \t\n\r'),
                                        'style', btrim(o.style #>> '{}', E' \t\n\r'),
                                        'length', btrim(o.length #>> '{}', E' \t\n\r'),
                                        'voice', btrim(o.voice #>> '{}', E' \t\n\r')) END
      FROM (SELECT coalesce(p_payload -> 'style', p_defaults -> 'style', p_fallback -> 'style') AS style,
                   coalesce(p_payload -> 'length', p_defaults -> 'length', p_fallback -> 'length') AS length,
                   coalesce(p_payload -> 'voice', p_defaults -> 'voice', p_fallback -> 'voice') AS voice) o
$$;

-- The cache's word on a job just claimed, inside the claim: 'render' (no entry to use: this job now
-- renders the request, and the entry names it, so identical jobs claimed after this commit wait for
-- it), 'hit' (a completed render younger than p_ttl), 'wait' (another live job renders it), or
-- 'ask' (another transaction holds the key's lock: the reactor asks render_cache_take(), which
-- waits for it). The lock is only tried, never waited for: a claim holds the claim lock, and
-- waiting here could close a cycle with a settle. On 'hit' and 'wait' the reactor asks
-- render_cache_take() too, which decides again under the lock; a job that renders asks nothing.
CREATE FUNCTION reactor.render_cache_claim(p_job uuid, p_key text, p_request jsonb, p_ttl interval)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    entry reactor.render_cache;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7240514, hashtext(p_key)) THEN
        RETURN 'ask';
    END IF;
    SELECT c.* INTO entry FROM reactor.render_cache c WHERE c.key = p_key;
    IF FOUND AND entry.status = 'completed' AND entry.completed_at > now() - p_ttl
       AND jsonb_typeof(entry.result) = 'object' AND entry.result ? 'video_url' THEN
        RETURN 'hit';
    END IF;
    IF FOUND AND entry.status = 'rendering' AND entry.job_id <> p_job AND EXISTS (
            SELECT 1 FROM reactor.jobs r WHERE r.id = entry.job_id AND r.status IN ('queued', 'processing')) THEN
        RETURN 'wait';
    END IF;
    INSERT INTO reactor.render_cache AS c (key, request, job_id, status)
    VALUES (p_key, p_request, p_job, 'rendering')
    ON CONFLICT (key) DO UPDATE
        SET request = EXCLUDED.request, job_id = EXCLUDED.job_id, status = 'rendering', result = NULL,
            started_at = now(), completed_at = NULL;
    RETURN 'render';
END
$$;

-- finish_and_claim (0008) with the render cache settled between the outcomes and the claim, in the
-- same transaction, and each claimed job's cache key and the cache's word on it (cache_key NULL:
-- the job does not use the cache). p_fallback: the reactor's default render options. The reactor
-- calls this one (sql/queries.sql, finish_and_claim).
CREATE FUNCTION reactor.finish_settle_and_claim(p_batch jsonb, p_reactor text, p_max integer,
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
    FOR r IN SELECT * FROM reactor.finish_and_claim(p_batch, p_reactor, 0, p_lease, p_clock) LOOP
        done := done || r.id;
        written := r.written; id := r.id; job_type := r.job_type; priority := r.priority;
        payload := r.payload; user_id := r.user_id; renderer := r.renderer; retry_count := r.retry_count;
        max_retries := r.max_retries; attempt := r.attempt; created_at := r.created_at;
        input_field := r.input_field; type_defaults := r.type_defaults; timeout_minutes := r.timeout_minutes;
        RETURN NEXT;
    END LOOP;
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

-- get_queue_stats() of 0009 with renders_saved: jobs completed from the cache in the last hour (read
-- in the same scan as completed_last_hour). A new OUT column changes the result type: DROP and CREATE.
DROP FUNCTION public.get_queue_stats();
CREATE FUNCTION public.get_queue_stats(
    OUT total bigint, OUT queued bigint, OUT processing bigint, OUT completed bigint,
    OUT failed bigint, OUT cancelled bigint,
    OUT queued_high bigint, OUT queued_medium bigint, OUT queued_low bigint,
    OUT avg_wait_seconds double precision, OUT avg_processing_seconds double precision,
    OUT oldest_queued_at timestamptz, OUT oldest_queued_age_seconds double precision,
    OUT completed_last_hour bigint, OUT failed_last_hour bigint,
    OUT max_renders integer, OUT max_manim_renders integer, OUT peak boolean, OUT paused boolean,
    OUT last_seq bigint, OUT as_of timestamptz, OUT renders_saved bigint)
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
               count(*) FILTER (WHERE j.status = 'completed' AND j.result ? 'cached_from') AS saved,
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
           c.last_seq, now(), finished.saved
    FROM reactor.counters c, oldest, started, finished, reactor.effective_limits(now()) l
$$;
COMMENT ON FUNCTION public.get_queue_stats() IS
    'Queue figures in one row (psql: SELECT * FROM get_queue_stats(); PostgREST: POST /rest/v1/rpc/get_queue_stats). '
    'Averages cover the last hour and are NULL when nothing started or completed in it. renders_saved: jobs '
    'completed from the render cache in the last hour.';

-- 3. Retention ------------------------------------------------------------------------------------

ALTER TABLE public.job_queue_config ADD COLUMN job_retention interval NOT NULL DEFAULT '30 days',
    ADD CONSTRAINT "job_queue_config.job_retention must be at least 1 minute"
        CHECK (job_retention >= interval '1 minute');
COMMENT ON COLUMN public.job_queue_config.job_retention IS
    'Completed, failed and cancelled jobs whose completed_at is older are deleted, with their events, by the sweep.';

-- deletes written by reactor.prune_jobs() journal themselves (no event: the totals only)
DROP TRIGGER jobs_stage_deletes ON reactor.jobs;
CREATE TRIGGER jobs_stage_deletes AFTER DELETE ON reactor.jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    WHEN (current_setting('reactor.journal', true) IS DISTINCT FROM pg_current_xact_id()::text)
    EXECUTE FUNCTION reactor.stage_deletes();

-- Delete up to p_limit finished jobs (completed, failed, cancelled) whose completed_at is older than
-- job_queue_config.job_retention, oldest first, with their events; from p_since on (NULL: from the
-- oldest). A job another transaction holds is skipped. The totals drop by what went (no event, seq
-- unchanged); the journal lock is taken last, so it is held only from there to the commit.
-- Returns how many jobs and events went, and the newest completed_at among them (the next floor).
CREATE FUNCTION reactor.prune_jobs(p_limit integer DEFAULT 1000, p_since timestamptz DEFAULT NULL,
                                   OUT jobs_pruned bigint, OUT events_pruned bigint,
                                   OUT last_completed_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz;
    gone   record;
BEGIN
    SELECT now() - c.job_retention INTO cutoff FROM public.job_queue_config c;
    PERFORM set_config('reactor.journal', pg_current_xact_id()::text, true);
    WITH pick AS (
        SELECT j.id FROM reactor.jobs j
         WHERE j.completed_at IS NOT NULL AND j.completed_at < cutoff
           AND j.completed_at >= coalesce(p_since, '-infinity')
           AND j.status IN ('completed', 'failed', 'cancelled')
         ORDER BY j.completed_at
         LIMIT greatest(p_limit, 0)
           FOR UPDATE SKIP LOCKED
    ), del AS (
        DELETE FROM reactor.jobs j USING pick WHERE j.id = pick.id
        RETURNING j.id, j.status, j.completed_at
    ), ev AS (
        DELETE FROM reactor.events e USING del WHERE e.job_id = del.id
        RETURNING 1
    ), cache AS (
        -- a cache entry goes with the job that rendered it (its result is that job's)
        DELETE FROM reactor.render_cache c USING del WHERE c.job_id = del.id
    )
    SELECT count(*) AS n,
           count(*) FILTER (WHERE del.status = 'completed') AS completed,
           count(*) FILTER (WHERE del.status = 'failed') AS failed,
           count(*) FILTER (WHERE del.status = 'cancelled') AS cancelled,
           max(del.completed_at) AS last_at,
           (SELECT count(*) FROM ev) AS events
      INTO gone FROM del;
    PERFORM set_config('reactor.journal', '', true);
    IF gone.n > 0 THEN
        PERFORM reactor.append_totals(0, 0, 0, 0, -gone.completed, -gone.failed, -gone.cancelled, 0, 0, 0,
                                      NULL, NULL, false);
    END IF;
    jobs_pruned := gone.n;
    events_pruned := gone.events;
    last_completed_at := gone.last_at;
END
$$;
COMMENT ON FUNCTION reactor.prune_jobs(integer, timestamptz) IS
    'Delete up to p_limit finished jobs older than job_queue_config.job_retention (by completed_at), with their '
    'events, from p_since on. Queued and processing jobs are never touched. Called by the sweep; `reactor prune`.';

-- 4. Positions of due jobs ------------------------------------------------------------------------
--
-- A queued job waiting for a future run_after has no position (0011) and holds no place ahead of
-- the due jobs of its queue: a due job's position is what 0010 computes, less the waiting jobs
-- ahead of it. Their keys are read once per statement, sorted, from jobs_delayed_idx (run_after >
-- now(): only the jobs still waiting, however many delayed jobs became due), and each due row
-- subtracts a binary search in them. No waiting job: one empty index range, nothing per row.

CREATE FUNCTION reactor.queue_waiting_keys() RETURNS uuid[]
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- the predicate of jobs_delayed_idx (0001), as the reactor's due-time read has it
    RETURN ARRAY(
        SELECT reactor.queue_key(j.priority_rank, j.created_at, j.job_no) FROM reactor.jobs j
         WHERE j.status = 'queued' AND j.run_after > j.created_at AND j.run_after > now()
         ORDER BY 1);
END
$$;
COMMENT ON FUNCTION reactor.queue_waiting_keys() IS
    'Queue keys of the queued jobs whose run_after is still ahead, sorted: they hold no place in the queue.';

CREATE OR REPLACE VIEW public.jobs WITH (security_invoker = true) AS
SELECT j.id,
       j.job_type,
       j.priority,
       j.status,
       j.payload,
       j.result,
       j.user_id,
       j.renderer,
       -- NULL until due; once due, the jobs still waiting for their run_after are not counted ahead
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
                     (SELECT reactor.queue_band_keys(2::smallint, true)))
                 - coalesce(width_bucket(reactor.queue_key(j.priority_rank, j.created_at, j.job_no - 1),
                                         (SELECT reactor.queue_waiting_keys())), 0) END AS queue_position,
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

-- Under the optional Supabase hardening (version 1001) the journal's functions run as their owner:
-- CREATE OR REPLACE above reset that.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        ALTER FUNCTION reactor.stage_inserts() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
        ALTER FUNCTION reactor.stage_deletes() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
        -- get_queue_stats() was created again: the privileges the hardening gave it
        REVOKE ALL ON FUNCTION public.get_queue_stats() FROM PUBLIC, anon, authenticated, service_role;
        GRANT EXECUTE ON FUNCTION public.get_queue_stats() TO authenticated, service_role;
    END IF;
END
$$;

INSERT INTO reactor.schema_migrations (version, name) VALUES (13, 'dedup_cache_retention');
