-- 0012_dedup_cache_retention: idempotent inserts, a render cache, and retention of finished jobs.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0012_dedup_cache_retention.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 11` (sql/rollback/0012_dedup_cache_retention.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- Three parts, each in its own section below (README, "Deduplication, the render cache and
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
-- 2. Render cache: see its section.
--
-- 3. Retention. job_queue_config.job_retention (default 30 days): completed, failed and cancelled
--    jobs whose completed_at is older are deleted with their events by reactor.prune_jobs(), in
--    batches (the sweep runs a few per sweep, each its own short transaction). They are nobody's
--    event: the totals drop by what was deleted and seq does not move.

-- 1. Deduplication --------------------------------------------------------------------------------

-- 0011_schedules may have added the column already
ALTER TABLE reactor.jobs ADD COLUMN IF NOT EXISTS idempotency_key text;
ALTER TABLE reactor.jobs ADD COLUMN idempotent_standin boolean;
COMMENT ON COLUMN reactor.jobs.idempotent_standin IS
    'true only on the copy of a live job that a deduplicated INSERT returns; deleted before its statement ends';

DO $$
BEGIN
    -- the view shows the key, unless 0011_schedules already made it do so
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                    WHERE attrelid = 'public.jobs'::regclass AND attname = 'idempotency_key'
                      AND NOT attisdropped) THEN
        CREATE OR REPLACE VIEW public.jobs WITH (security_invoker = true) AS
        SELECT j.id,
               j.job_type,
               j.priority,
               j.status,
               j.payload,
               j.result,
               j.user_id,
               j.renderer,
               CASE WHEN j.status = 'queued'
                    THEN reactor.queue_position(j.priority_rank, j.created_at, j.job_no) END AS queue_position,
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
               j.idempotency_key
        FROM reactor.jobs j;
    END IF;
END
$$;

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

-- Under the optional Supabase hardening (version 1001) the journal's functions run as their owner:
-- CREATE OR REPLACE above reset that.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        ALTER FUNCTION reactor.stage_inserts() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
        ALTER FUNCTION reactor.stage_deletes() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

INSERT INTO reactor.schema_migrations (version, name) VALUES (12, 'dedup_cache_retention');
