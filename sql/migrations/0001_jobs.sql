-- 0001_jobs: the SQL contract of the reactor.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0001_jobs.sql
-- Roll back with `reactor migrate --dsn DSN --down` (sql/rollback/0001_jobs.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- What users see (schema public):
--   jobs              view: one row per job, with its live queue_position; INSERT/UPDATE/DELETE go
--                     through to reactor.jobs
--   job_types         table: the job types and the renderer each uses (operators add types with SQL)
--   job_queue_config  table: exactly one row of limits and alert thresholds
--   job_events        view: the history of every job (one row per insert or status change)
--   get_queue_stats() function: counts, waits and ages in one call (psql and PostgREST RPC)
--   update_queue_positions() function: kept for old callers; positions are computed when read
-- What only the reactor touches (schema reactor): the jobs table, the event log, counters,
-- the registry of running reactors and the migration ledger.

CREATE SCHEMA reactor;
COMMENT ON SCHEMA reactor IS 'Internals of the job reactor; users work through public.jobs and friends.';

CREATE TABLE reactor.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Job types ---------------------------------------------------------------------------------------

CREATE TABLE public.job_types (
    name        text PRIMARY KEY,
    renderer    text NOT NULL DEFAULT 'revideo',
    input_field text NOT NULL,
    defaults    jsonb NOT NULL DEFAULT '{}'::jsonb,
    description text,
    CONSTRAINT "job_types.name must be lowercase letters, digits or _"
        CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT "job_types.renderer must be lowercase letters, digits or _"
        CHECK (renderer ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT "job_types.input_field must not be empty" CHECK (input_field <> ''),
    CONSTRAINT "job_types.defaults must be a JSON object" CHECK (jsonb_typeof(defaults) = 'object')
);
COMMENT ON TABLE public.job_types IS
    'Job types. renderer decides which concurrency limit a job counts against (manim: max_manim_renders); '
    'input_field is the payload key sent to the orchestrator as input; defaults fill style/length/voice.';

INSERT INTO public.job_types (name, renderer, input_field, description) VALUES
    ('doubt',       'manim',   'question', 'A student''s question, explained step by step'),
    ('topic_short', 'revideo', 'topic',    'A short explainer on a chosen topic'),
    ('daily_ca',    'revideo', 'date',     'The daily current-affairs digest for a date');

-- Queue configuration -----------------------------------------------------------------------------

CREATE TABLE public.job_queue_config (
    id                      boolean PRIMARY KEY DEFAULT true,
    max_concurrent_renders  integer NOT NULL DEFAULT 10,
    max_manim_renders       integer NOT NULL DEFAULT 4,
    job_timeout_minutes     integer NOT NULL DEFAULT 10,
    peak_hour_start         time,
    peak_hour_end           time,
    peak_worker_multiplier  numeric NOT NULL DEFAULT 1.0,
    timezone                text NOT NULL DEFAULT 'UTC',
    alert_queue_depth       integer NOT NULL DEFAULT 50,
    alert_failed_per_hour   integer NOT NULL DEFAULT 10,
    alert_avg_wait_minutes  integer NOT NULL DEFAULT 15,
    event_retention         interval NOT NULL DEFAULT '7 days',
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "job_queue_config holds exactly one row" CHECK (id)
);
COMMENT ON TABLE public.job_queue_config IS
    'Exactly one row. max_concurrent_renders = 0 pauses dispatch. Peak hours are read in timezone; '
    'during them both limits are multiplied by peak_worker_multiplier (rounded down, at least 1 '
    'unless the limit itself is 0).';

INSERT INTO public.job_queue_config DEFAULT VALUES;

CREATE FUNCTION reactor.check_config() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'job_queue_config must keep its one row: UPDATE it instead of deleting'
            USING ERRCODE = 'restrict_violation', TABLE = 'job_queue_config';
    END IF;
    IF TG_OP = 'INSERT' AND EXISTS (SELECT 1 FROM public.job_queue_config) THEN
        RAISE EXCEPTION 'job_queue_config holds exactly one row: UPDATE it instead of inserting another'
            USING ERRCODE = 'unique_violation', TABLE = 'job_queue_config';
    END IF;
    IF NEW.id IS DISTINCT FROM true THEN
        RAISE EXCEPTION 'job_queue_config.id must stay true (the table holds exactly one row)'
            USING ERRCODE = 'check_violation', COLUMN = 'id', TABLE = 'job_queue_config';
    END IF;
    IF NEW.max_concurrent_renders IS NULL OR NEW.max_concurrent_renders < 0 THEN
        RAISE EXCEPTION 'job_queue_config.max_concurrent_renders must be 0 (paused) or more, got %',
            coalesce(NEW.max_concurrent_renders::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'max_concurrent_renders', TABLE = 'job_queue_config';
    END IF;
    IF NEW.max_manim_renders IS NULL OR NEW.max_manim_renders < 0 THEN
        RAISE EXCEPTION 'job_queue_config.max_manim_renders must be 0 or more, got %',
            coalesce(NEW.max_manim_renders::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'max_manim_renders', TABLE = 'job_queue_config';
    END IF;
    IF NEW.job_timeout_minutes IS NULL OR NEW.job_timeout_minutes < 1 THEN
        RAISE EXCEPTION 'job_queue_config.job_timeout_minutes must be 1 or more, got %',
            coalesce(NEW.job_timeout_minutes::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'job_timeout_minutes', TABLE = 'job_queue_config';
    END IF;
    IF NEW.peak_worker_multiplier IS NULL OR NEW.peak_worker_multiplier <= 0 THEN
        RAISE EXCEPTION 'job_queue_config.peak_worker_multiplier must be greater than 0, got %',
            coalesce(NEW.peak_worker_multiplier::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'peak_worker_multiplier', TABLE = 'job_queue_config';
    END IF;
    IF (NEW.peak_hour_start IS NULL) <> (NEW.peak_hour_end IS NULL) THEN
        RAISE EXCEPTION 'job_queue_config.% is NULL: peak_hour_start and peak_hour_end must both be set or both be NULL',
            CASE WHEN NEW.peak_hour_start IS NULL THEN 'peak_hour_start' ELSE 'peak_hour_end' END
            USING ERRCODE = 'check_violation', TABLE = 'job_queue_config',
                  COLUMN = CASE WHEN NEW.peak_hour_start IS NULL THEN 'peak_hour_start' ELSE 'peak_hour_end' END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names WHERE name = NEW.timezone) THEN
        RAISE EXCEPTION 'job_queue_config.timezone must be a time zone name such as UTC or Asia/Kolkata, got %',
            quote_literal(coalesce(NEW.timezone, 'NULL'))
            USING ERRCODE = 'check_violation', COLUMN = 'timezone', TABLE = 'job_queue_config';
    END IF;
    IF NEW.alert_queue_depth IS NULL OR NEW.alert_queue_depth < 0 THEN
        RAISE EXCEPTION 'job_queue_config.alert_queue_depth must be 0 or more, got %',
            coalesce(NEW.alert_queue_depth::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'alert_queue_depth', TABLE = 'job_queue_config';
    END IF;
    IF NEW.alert_failed_per_hour IS NULL OR NEW.alert_failed_per_hour < 0 THEN
        RAISE EXCEPTION 'job_queue_config.alert_failed_per_hour must be 0 or more, got %',
            coalesce(NEW.alert_failed_per_hour::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'alert_failed_per_hour', TABLE = 'job_queue_config';
    END IF;
    IF NEW.alert_avg_wait_minutes IS NULL OR NEW.alert_avg_wait_minutes < 0 THEN
        RAISE EXCEPTION 'job_queue_config.alert_avg_wait_minutes must be 0 or more, got %',
            coalesce(NEW.alert_avg_wait_minutes::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'alert_avg_wait_minutes', TABLE = 'job_queue_config';
    END IF;
    IF NEW.event_retention IS NULL OR NEW.event_retention < interval '1 minute' THEN
        RAISE EXCEPTION 'job_queue_config.event_retention must be at least 1 minute, got %',
            coalesce(NEW.event_retention::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'event_retention', TABLE = 'job_queue_config';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER job_queue_config_check
    BEFORE INSERT OR UPDATE OR DELETE ON public.job_queue_config
    FOR EACH ROW EXECUTE FUNCTION reactor.check_config();

CREATE FUNCTION reactor.refuse_config_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job_queue_config must keep its one row: UPDATE it instead of truncating'
        USING ERRCODE = 'restrict_violation', TABLE = 'job_queue_config';
END
$$;

CREATE TRIGGER job_queue_config_no_truncate
    BEFORE TRUNCATE ON public.job_queue_config
    FOR EACH STATEMENT EXECUTE FUNCTION reactor.refuse_config_truncate();

-- A changed limit must wake every reactor at once (raising a limit frees capacity).
CREATE FUNCTION reactor.notify_config() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('reactor_config', '{}');
    RETURN NULL;
END
$$;

CREATE TRIGGER job_queue_config_notify
    AFTER UPDATE ON public.job_queue_config
    FOR EACH STATEMENT EXECUTE FUNCTION reactor.notify_config();

-- Jobs --------------------------------------------------------------------------------------------

CREATE TABLE reactor.jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_no           bigint GENERATED ALWAYS AS IDENTITY,
    job_type         text NOT NULL,
    priority         text NOT NULL DEFAULT 'medium',
    status           text NOT NULL DEFAULT 'queued',
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    result           jsonb,
    user_id          uuid,
    renderer         text NOT NULL,
    retry_count      integer NOT NULL DEFAULT 0,
    max_retries      integer NOT NULL DEFAULT 3,
    error_message    text,
    error_category   text,
    error_details    jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    run_after        timestamptz NOT NULL DEFAULT now(),
    attempt          integer NOT NULL DEFAULT 0,
    locked_by        text,
    lease_expires_at timestamptz,
    priority_rank    smallint GENERATED ALWAYS AS (
        CASE priority WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END) STORED,
    -- Backstops: the trigger below raises clearer errors first.
    CONSTRAINT "jobs.priority must be high, medium or low" CHECK (priority IN ('high', 'medium', 'low')),
    CONSTRAINT "jobs.status must be queued, processing, completed, failed or cancelled"
        CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    CONSTRAINT "jobs.payload must be a JSON object" CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT "jobs.result must be a JSON object" CHECK (result IS NULL OR jsonb_typeof(result) = 'object'),
    CONSTRAINT "jobs.retry_count must be 0 or more" CHECK (retry_count >= 0),
    CONSTRAINT "jobs.max_retries must be 0 or more" CHECK (max_retries >= 0),
    CONSTRAINT "jobs.error_category is not a known category" CHECK (error_category IS NULL OR error_category IN
        ('TIMEOUT', 'API_ERROR', 'INVALID_INPUT', 'NOT_FOUND', 'UNKNOWN')),
    CONSTRAINT "jobs.job_type must be a known job type" FOREIGN KEY (job_type)
        REFERENCES public.job_types (name) ON UPDATE CASCADE
);

-- Queued jobs in claim order, split by whether they count against max_manim_renders, so that a
-- renderer at its limit never makes the claim scan past its own jobs to reach the others'.
CREATE INDEX jobs_queue_manim_idx ON reactor.jobs (priority_rank, created_at, job_no)
    WHERE status = 'queued' AND renderer = 'manim';
CREATE INDEX jobs_queue_other_idx ON reactor.jobs (priority_rank, created_at, job_no)
    WHERE status = 'queued' AND renderer <> 'manim';
CREATE INDEX jobs_processing_idx ON reactor.jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX jobs_user_idx ON reactor.jobs (user_id, created_at) WHERE user_id IS NOT NULL;
CREATE INDEX jobs_created_idx ON reactor.jobs (created_at);
CREATE INDEX jobs_started_idx ON reactor.jobs (started_at) WHERE started_at IS NOT NULL;
CREATE INDEX jobs_completed_idx ON reactor.jobs (completed_at) WHERE completed_at IS NOT NULL;

-- Clear errors that name the column, and the bookkeeping every writer would otherwise forget.
CREATE FUNCTION reactor.jobs_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    type_renderer text;
BEGIN
    IF NEW.job_type IS NULL THEN
        RAISE EXCEPTION 'jobs.job_type is required (one of the names in job_types)'
            USING ERRCODE = 'not_null_violation', COLUMN = 'job_type', TABLE = 'jobs';
    END IF;
    IF TG_OP = 'INSERT' OR NEW.job_type IS DISTINCT FROM OLD.job_type THEN
        SELECT t.renderer INTO type_renderer FROM public.job_types t WHERE t.name = NEW.job_type;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'jobs.job_type % is not a known job type; known: % (add one with INSERT INTO job_types)',
                quote_literal(NEW.job_type),
                (SELECT string_agg(name, ', ' ORDER BY name) FROM public.job_types)
                USING ERRCODE = 'foreign_key_violation', COLUMN = 'job_type', TABLE = 'jobs';
        END IF;
        IF TG_OP = 'INSERT' AND NEW.renderer IS NULL THEN
            NEW.renderer := type_renderer;
        END IF;
    END IF;
    IF NEW.priority IS NULL OR NEW.priority NOT IN ('high', 'medium', 'low') THEN
        RAISE EXCEPTION 'jobs.priority must be high, medium or low, got %', quote_nullable(NEW.priority)
            USING ERRCODE = 'check_violation', COLUMN = 'priority', TABLE = 'jobs';
    END IF;
    IF NEW.status IS NULL OR NEW.status NOT IN ('queued', 'processing', 'completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'jobs.status must be queued, processing, completed, failed or cancelled, got %',
            quote_nullable(NEW.status)
            USING ERRCODE = 'check_violation', COLUMN = 'status', TABLE = 'jobs';
    END IF;
    IF NEW.payload IS NULL OR jsonb_typeof(NEW.payload) <> 'object' THEN
        RAISE EXCEPTION 'jobs.payload must be a JSON object, got %', coalesce(jsonb_typeof(NEW.payload), 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'payload', TABLE = 'jobs';
    END IF;
    IF NEW.result IS NOT NULL AND jsonb_typeof(NEW.result) <> 'object' THEN
        RAISE EXCEPTION 'jobs.result must be a JSON object or NULL, got %', jsonb_typeof(NEW.result)
            USING ERRCODE = 'check_violation', COLUMN = 'result', TABLE = 'jobs';
    END IF;
    IF NEW.renderer IS NULL OR NEW.renderer !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'jobs.renderer must be lowercase letters, digits or _, got %', quote_nullable(NEW.renderer)
            USING ERRCODE = 'check_violation', COLUMN = 'renderer', TABLE = 'jobs';
    END IF;
    IF NEW.retry_count IS NULL OR NEW.retry_count < 0 THEN
        RAISE EXCEPTION 'jobs.retry_count must be 0 or more, got %', coalesce(NEW.retry_count::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'retry_count', TABLE = 'jobs';
    END IF;
    IF NEW.max_retries IS NULL OR NEW.max_retries < 0 THEN
        RAISE EXCEPTION 'jobs.max_retries must be 0 or more, got %', coalesce(NEW.max_retries::text, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'max_retries', TABLE = 'jobs';
    END IF;

    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'processing' AND NEW.started_at IS NULL THEN
            NEW.started_at := now();
        END IF;
        IF NEW.status IN ('completed', 'failed', 'cancelled') AND NEW.completed_at IS NULL THEN
            NEW.completed_at := now();
        END IF;
        RETURN NEW;
    END IF;

    NEW.updated_at := now();
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NEW.status = 'processing' THEN
            -- keep a started_at the writer set on purpose (the runbook's "stuck since" case)
            IF NEW.started_at IS NOT DISTINCT FROM OLD.started_at THEN
                NEW.started_at := now();
            END IF;
            NEW.completed_at := NULL;
        ELSE
            IF OLD.status = 'processing' THEN
                NEW.locked_by := NULL;
                NEW.lease_expires_at := NULL;
            END IF;
            IF NEW.status = 'queued' THEN
                NEW.completed_at := NULL;
            ELSIF NEW.completed_at IS NOT DISTINCT FROM OLD.completed_at THEN
                NEW.completed_at := now();
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_before_write
    BEFORE INSERT OR UPDATE ON reactor.jobs
    FOR EACH ROW EXECUTE FUNCTION reactor.jobs_before_write();

-- Position of a queued job: how many queued jobs come before it (priority, then oldest), plus one.
-- Computed when read, so no enqueue or dequeue ever rewrites another job's row; the cost is an
-- index-only count over the jobs ahead (see README, "Queue positions").
CREATE FUNCTION reactor.queue_position(p_rank smallint, p_created timestamptz, p_no bigint)
RETURNS bigint
-- a bitmap scan reads every heap page of the jobs ahead; the index-only scan reads the index
LANGUAGE sql STABLE PARALLEL SAFE SET enable_bitmapscan = off AS $$
    SELECT 1
         + (SELECT count(*) FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer = 'manim'
               AND (q.priority_rank, q.created_at, q.job_no) < (p_rank, p_created, p_no))
         + (SELECT count(*) FROM reactor.jobs q
             WHERE q.status = 'queued' AND q.renderer <> 'manim'
               AND (q.priority_rank, q.created_at, q.job_no) < (p_rank, p_created, p_no))
$$;

CREATE VIEW public.jobs WITH (security_invoker = true) AS
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
       j.lease_expires_at
FROM reactor.jobs j;
COMMENT ON VIEW public.jobs IS
    'One row per job. Insert with INSERT INTO jobs (job_type, payload[, priority, user_id]). '
    'queue_position is computed when read (1 = next to start) and NULL unless queued. A multi-row '
    'INSERT ... RETURNING queue_position numbers each row against the queue as it was before the '
    'statement; read the positions again after a batch insert.';

-- Events, counters and NOTIFY ---------------------------------------------------------------------
--
-- Every insert, status change, priority change and delete of a job becomes one event. Statement
-- triggers stage a statement's events (one INSERT ... SELECT over the transition table, however many
-- rows); at commit a deferred trigger, fired once per transaction, takes the counters row lock,
-- numbers the staged events (seq: contiguous, and committed in seq order, so a reader that has seen
-- seq N never later finds a smaller one), moves them into reactor.events, adjusts the running totals
-- and sends one small NOTIFY. The lock is held only from pre-commit to commit, like NOTIFY's own.

CREATE TABLE reactor.counters (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_seq      bigint NOT NULL DEFAULT 0,
    queued        bigint NOT NULL DEFAULT 0,
    processing    bigint NOT NULL DEFAULT 0,
    completed     bigint NOT NULL DEFAULT 0,
    failed        bigint NOT NULL DEFAULT 0,
    cancelled     bigint NOT NULL DEFAULT 0,
    queued_high   bigint NOT NULL DEFAULT 0,
    queued_medium bigint NOT NULL DEFAULT 0,
    queued_low    bigint NOT NULL DEFAULT 0
);
INSERT INTO reactor.counters DEFAULT VALUES;

CREATE TABLE reactor.events (
    seq            bigint PRIMARY KEY,
    job_id         uuid NOT NULL,
    kind           text NOT NULL,
    status         text,
    old_status     text,
    priority       text,
    job_type       text,
    renderer       text,
    user_id        uuid,
    retry_count    integer,
    error_category text,
    actor          text,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_job_idx ON reactor.events (job_id, seq);
CREATE INDEX events_at_idx ON reactor.events (at);

-- Transient: rows live from a statement to its transaction's commit (or vanish with a rollback).
CREATE UNLOGGED TABLE reactor.event_stage (
    ord            bigint GENERATED ALWAYS AS IDENTITY,
    xid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    job_id         uuid NOT NULL,
    kind           text NOT NULL,
    status         text,
    old_status     text,
    priority       text,
    old_priority   text,
    job_type       text,
    renderer       text,
    user_id        uuid,
    retry_count    integer,
    error_category text,
    actor          text
);
CREATE INDEX event_stage_xid_idx ON reactor.event_stage (xid, ord);

CREATE UNLOGGED TABLE reactor.pending_commits (xid xid8 PRIMARY KEY);

CREATE VIEW public.job_events WITH (security_invoker = true) AS
SELECT seq, job_id, kind, status, old_status, priority, job_type, renderer, user_id, retry_count,
       error_category, actor, at
FROM reactor.events;
COMMENT ON VIEW public.job_events IS
    'History of every job: inserted, started, retrying, requeued, completed, failed, cancelled, '
    'reprioritized, deleted. seq increases without gaps in commit order; rows older than '
    'job_queue_config.event_retention are pruned by the reactor''s sweep.';

-- Who made a change: the reactor (and its CLI and feed) set reactor.actor for their own writes; a
-- request through PostgREST is its JWT's subject; anything else is the database role that logged in.
CREATE FUNCTION reactor.current_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('reactor.actor', true), ''),
        'user:' || nullif(coalesce(
            nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
            current_setting('request.jwt.claim.sub', true)), ''),
        'sql:' || session_user)
$$;

CREATE FUNCTION reactor.stage_inserts() RETURNS trigger
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

CREATE FUNCTION reactor.stage_updates() RETURNS trigger
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

CREATE FUNCTION reactor.stage_deletes() RETURNS trigger
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

CREATE TRIGGER jobs_stage_inserts AFTER INSERT ON reactor.jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION reactor.stage_inserts();
CREATE TRIGGER jobs_stage_updates AFTER UPDATE ON reactor.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION reactor.stage_updates();
CREATE TRIGGER jobs_stage_deletes AFTER DELETE ON reactor.jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION reactor.stage_deletes();

-- Fired once per transaction, at commit (deferred), for the transaction's pending_commits row.
CREATE FUNCTION reactor.sequence_commit() RETURNS trigger
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
    UPDATE reactor.counters c
       SET last_seq = c.last_seq + d.n,
           queued = c.queued + d.queued,
           processing = c.processing + d.processing,
           completed = c.completed + d.completed,
           failed = c.failed + d.failed,
           cancelled = c.cancelled + d.cancelled,
           queued_high = c.queued_high + d.q_high,
           queued_medium = c.queued_medium + d.q_medium,
           queued_low = c.queued_low + d.q_low
     RETURNING c.last_seq INTO last;
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

CREATE CONSTRAINT TRIGGER pending_commits_sequence AFTER INSERT ON reactor.pending_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION reactor.sequence_commit();

-- TRUNCATE bypasses row triggers: recount (zero) the totals; the event numbering goes on.
CREATE FUNCTION reactor.recount() RETURNS void
LANGUAGE sql AS $$
    UPDATE reactor.counters c SET
        queued = s.queued, processing = s.processing, completed = s.completed, failed = s.failed,
        cancelled = s.cancelled, queued_high = s.q_high, queued_medium = s.q_medium, queued_low = s.q_low
    FROM (SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
                 count(*) FILTER (WHERE status = 'processing') AS processing,
                 count(*) FILTER (WHERE status = 'completed') AS completed,
                 count(*) FILTER (WHERE status = 'failed') AS failed,
                 count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                 count(*) FILTER (WHERE status = 'queued' AND priority = 'high') AS q_high,
                 count(*) FILTER (WHERE status = 'queued' AND priority = 'medium') AS q_medium,
                 count(*) FILTER (WHERE status = 'queued' AND priority = 'low') AS q_low
          FROM reactor.jobs) s
$$;
COMMENT ON FUNCTION reactor.recount() IS 'Recompute the running totals from reactor.jobs (repair tool; O(jobs)).';

CREATE FUNCTION reactor.on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM reactor.recount();
    PERFORM pg_notify('reactor_events', json_build_object('truncated', true)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_truncate AFTER TRUNCATE ON reactor.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION reactor.on_truncate();

CREATE FUNCTION reactor.prune_events() RETURNS bigint
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM reactor.events
         WHERE at < now() - (SELECT event_retention FROM public.job_queue_config)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

-- Limits in effect ------------------------------------------------------------------------------

CREATE FUNCTION reactor.effective_limits(p_at timestamptz DEFAULT now(),
    OUT max_renders integer, OUT max_manim integer, OUT peak boolean, OUT paused boolean)
LANGUAGE sql STABLE AS $$
    WITH c AS (
        SELECT cfg.*, (p_at AT TIME ZONE cfg.timezone)::time AS local_time FROM public.job_queue_config cfg
    ), p AS (
        SELECT c.*, coalesce(CASE
            WHEN c.peak_hour_start IS NULL OR c.peak_hour_start = c.peak_hour_end THEN false
            WHEN c.peak_hour_start < c.peak_hour_end
                THEN c.local_time >= c.peak_hour_start AND c.local_time < c.peak_hour_end
            ELSE c.local_time >= c.peak_hour_start OR c.local_time < c.peak_hour_end
        END, false) AS is_peak FROM c
    )
    SELECT CASE WHEN is_peak AND max_concurrent_renders > 0
                THEN greatest(1, floor(max_concurrent_renders * peak_worker_multiplier))::integer
                ELSE max_concurrent_renders END,
           CASE WHEN is_peak AND max_manim_renders > 0
                THEN greatest(1, floor(max_manim_renders * peak_worker_multiplier))::integer
                ELSE max_manim_renders END,
           is_peak,
           max_concurrent_renders = 0
    FROM p
$$;

-- Stats -------------------------------------------------------------------------------------------

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
COMMENT ON FUNCTION public.get_queue_stats() IS
    'Queue figures in one row (psql: SELECT * FROM get_queue_stats(); PostgREST: POST /rest/v1/rpc/get_queue_stats). '
    'Averages cover the last hour and are NULL when nothing started or completed in it.';

CREATE FUNCTION public.update_queue_positions() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT queued FROM reactor.counters
$$;
COMMENT ON FUNCTION public.update_queue_positions() IS
    'Kept for callers of the old system. Positions are computed when read (jobs.queue_position), so '
    'there is nothing to renumber: this returns the number of queued jobs and changes nothing.';

-- Reactors that are running (heartbeats), for status and leader choice ----------------------------

CREATE TABLE reactor.reactors (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- the reactor's view of the render farm: closed (fine), open (unreachable), half_open (trying)
    circuit_state text NOT NULL DEFAULT 'closed',
    circuit_since timestamptz
);

-- Claiming, leases and the sweep (used by the reactor) --------------------------------------------

-- Delayed (retrying) queued jobs, so that the reactor can wake at the next due time.
CREATE INDEX jobs_delayed_idx ON reactor.jobs (run_after) WHERE status = 'queued' AND run_after > created_at;

-- Claim up to p_max runnable jobs for p_reactor, in priority order, within the fleet-wide limits
-- in effect at p_clock (peak hours). Claims are serialised by an advisory lock, so the in-flight
-- count read here cannot be raced by another reactor; rows are taken with SKIP LOCKED so a
-- writer holding a queued row never blocks dispatch. A renderer at its limit does not hold back
-- the others: manim and non-manim jobs are read from their own indexes.
CREATE FUNCTION reactor.claim_jobs(p_reactor text, p_max integer, p_lease interval,
                                   p_clock timestamptz DEFAULT now())
RETURNS TABLE (id uuid, job_type text, priority text, payload jsonb, user_id uuid, renderer text,
               retry_count integer, max_retries integer, attempt integer, created_at timestamptz,
               input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql AS $$
DECLARE
    lim         record;
    run_total   integer;
    run_manim   integer;
    free_total  integer;
    free_manim  integer;
    timeout_min integer;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7240513002);
    -- the same rule as reactor.effective_limits(), inlined: plpgsql caches this plan
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
    SELECT count(*), count(*) FILTER (WHERE j.renderer = 'manim')
      INTO run_total, run_manim
      FROM reactor.jobs j WHERE j.status = 'processing';
    free_total := least(lim.max_renders - run_total, p_max);
    IF free_total <= 0 THEN
        RETURN;
    END IF;
    free_manim := greatest(least(lim.max_manim - run_manim, free_total), 0);
    timeout_min := lim.job_timeout_minutes;
    RETURN QUERY
    WITH cand_manim AS (
        SELECT q.id, q.priority_rank, q.created_at, q.job_no FROM reactor.jobs q
         WHERE q.status = 'queued' AND q.renderer = 'manim' AND q.run_after <= now()
         ORDER BY q.priority_rank, q.created_at, q.job_no
         LIMIT free_manim FOR UPDATE SKIP LOCKED
    ), cand_other AS (
        SELECT q.id, q.priority_rank, q.created_at, q.job_no FROM reactor.jobs q
         WHERE q.status = 'queued' AND q.renderer <> 'manim' AND q.run_after <= now()
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
    )
    SELECT upd.id, upd.job_type, upd.priority, upd.payload, upd.user_id, upd.renderer,
           upd.retry_count, upd.max_retries, upd.attempt, upd.created_at,
           t.input_field, t.defaults, timeout_min
      FROM upd JOIN public.job_types t ON t.name = upd.job_type
     ORDER BY upd.priority_rank, upd.created_at, upd.job_no;
END
$$;

-- Write the outcomes of finished attempts (only where the lease is still ours: same reactor, same
-- attempt, still processing), then claim again: one round trip and one commit for both.
-- Rows with written = true name the jobs whose outcome was recorded; the others are new claims.
CREATE FUNCTION reactor.finish_and_claim(p_batch jsonb, p_reactor text, p_max integer, p_lease interval,
                                         p_clock timestamptz DEFAULT now())
RETURNS TABLE (written boolean, id uuid, job_type text, priority text, payload jsonb, user_id uuid,
               renderer text, retry_count integer, max_retries integer, attempt integer,
               created_at timestamptz, input_field text, type_defaults jsonb, timeout_minutes integer)
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_array_length(p_batch) > 0 THEN
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
            RETURNING j.id)
        SELECT true, f.id, NULL::text, NULL::text, NULL::jsonb, NULL::uuid, NULL::text, NULL::integer,
               NULL::integer, NULL::integer, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::integer
          FROM f;
    END IF;
    IF p_max > 0 THEN
        RETURN QUERY SELECT false, c.* FROM reactor.claim_jobs(p_reactor, p_max, p_lease, p_clock) c;
    END IF;
END
$$;

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

INSERT INTO reactor.schema_migrations (version, name) VALUES (1, 'jobs');
