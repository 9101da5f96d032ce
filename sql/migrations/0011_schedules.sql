-- 0011_schedules: periodic schedules (cron, evaluated in the database), and delayed jobs that wake
-- the reactor.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0011_schedules.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 10` (sql/rollback/0011_schedules.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- What users see:
--   job_schedules     table: one row per schedule (name, cron, timezone, job_type, priority, payload,
--                     enabled, catch_up); next_run_at and last_run_at are kept by the system
--   jobs.schedule_name, jobs.idempotency_key
--                     the schedule that made a job, and 'schedule:' || name || ':' || slot (UTC, ISO)
--   reactor.cron_next(cron, timezone, after)
--                     the first time after `after` that a 5-field cron expression names
--   reactor.fire_schedules(p_now)
--                     makes the jobs of every slot due by p_now (the reactor calls it; so may psql)
--   reactor.run_schedule_now(name)
--                     one job of the schedule now, outside its slots
--
-- Exactly one job per slot, whatever the number of reactors: fire_schedules() takes each due
-- schedule's row with FOR UPDATE SKIP LOCKED, inserts the slot's job and moves next_run_at past it
-- in the same transaction; a second caller skips the locked row, or rereads it after the commit and
-- finds it no longer due. A unique index on (schedule_name, idempotency_key) backs it up. The times
-- are the database's: the reactors' clocks never decide a slot.
--
-- Delayed jobs: queue_position is NULL until run_after (the jobs view). An INSERT (or an UPDATE of a queued job's run_after) with a run_after in the future
-- sends NOTIFY reactor_due, so that every reactor re-reads its earliest due time at once; nothing
-- polls. A change of job_schedules by anyone but fire_schedules() sends NOTIFY reactor_schedules.

-- Jobs: the schedule that made them --------------------------------------------------------------

ALTER TABLE reactor.jobs
    ADD COLUMN schedule_name text,
    ADD COLUMN idempotency_key text;
COMMENT ON COLUMN reactor.jobs.schedule_name IS 'The schedule (job_schedules.name) that made this job; NULL otherwise.';
COMMENT ON COLUMN reactor.jobs.idempotency_key IS
    'A key naming what this job is for. Jobs of a schedule: ''schedule:'' || name || '':'' || slot (UTC, ISO).';

-- at most one job per schedule and slot, kept for as long as the jobs are
CREATE UNIQUE INDEX jobs_schedule_slot_idx ON reactor.jobs (schedule_name, idempotency_key)
    WHERE schedule_name IS NOT NULL;

CREATE OR REPLACE VIEW public.jobs WITH (security_invoker = true) AS
SELECT j.id,
       j.job_type,
       j.priority,
       j.status,
       j.payload,
       j.result,
       j.user_id,
       j.renderer,
       -- NULL until due: a job that waits for its run_after has no place in the queue yet
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
                     (SELECT reactor.queue_band_keys(2::smallint, true))) END AS queue_position,
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

-- A job that waits for a future run_after wakes the reactors (they sleep until the earliest one).
CREATE FUNCTION reactor.notify_due() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- one payload for all: NOTIFY folds them into one per transaction
    PERFORM pg_notify('reactor_due', '{}');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_due_insert
    AFTER INSERT ON reactor.jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.run_after > NEW.created_at)
    EXECUTE FUNCTION reactor.notify_due();
-- a queued job moved by hand (a retry's new run_after is announced by its 'retrying' event)
CREATE TRIGGER jobs_notify_due_update
    AFTER UPDATE OF run_after ON reactor.jobs
    FOR EACH ROW WHEN (OLD.status = 'queued' AND NEW.status = 'queued'
                       AND NEW.run_after IS DISTINCT FROM OLD.run_after)
    EXECUTE FUNCTION reactor.notify_due();

-- Cron --------------------------------------------------------------------------------------------
--
-- Five fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or JAN-DEC), day of week
-- (0-7 or SUN-SAT; 0 and 7 are Sunday). Each field is * or a list of items, an item being a value,
-- a range a-b, or either (or *) followed by /step; a/step means a to the field's end by step.
-- When neither the day-of-month nor the day-of-week field starts with *, a day matches if either
-- does (the standard OR rule); otherwise both must.
--
-- Time zones, as Debian's cron (and the cronsim library, the tests' oracle) does: an expression
-- whose minute and hour fields are both fixed (neither starts with *) names wall-clock times: one
-- that falls in a DST gap runs at the first minute after the gap, one that occurs twice runs once,
-- at the first. Any other expression (every minute, every hour, */15 ...) is matched against the
-- local time of each real minute: nothing is skipped in a gap, and the repeated hour runs twice.

-- The parsed form of one field: its values, sorted; raises with the field's name when it is bad.
CREATE FUNCTION reactor.cron_field(p_text text, p_field integer) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    names  text[] := CASE p_field
        WHEN 4 THEN ARRAY['JAN','FEB','MAR','APR','MAY','JUN','JUL','AUG','SEP','OCT','NOV','DEC']
        WHEN 5 THEN ARRAY['SUN','MON','TUE','WED','THU','FRI','SAT'] END;
    lo     integer := (ARRAY[0, 0, 1, 1, 0])[p_field];
    hi     integer := (ARRAY[59, 23, 31, 12, 7])[p_field];
    fname  text := (ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'])[p_field];
    item   text;
    base   text;
    step   integer;
    a      integer;
    b      integer;
    m      text[];
    vals   integer[] := '{}';
BEGIN
    IF p_text IS NULL OR p_text = '' THEN
        RAISE EXCEPTION 'the % field is empty', fname;
    END IF;
    FOREACH item IN ARRAY string_to_array(upper(p_text), ',') LOOP
        m := regexp_match(item, '^([^/]*)(?:/([0-9]+))?$');
        IF m IS NULL OR (position('/' IN item) > 0 AND m[2] IS NULL) THEN
            RAISE EXCEPTION 'the % field has a bad item %', fname, quote_literal(item);
        END IF;
        base := m[1];
        step := CASE WHEN m[2] IS NULL THEN NULL ELSE least(m[2]::numeric, 1000)::integer END;
        IF step = 0 THEN
            RAISE EXCEPTION 'the % field has a step of 0 in %', fname, quote_literal(item);
        END IF;
        IF base = '*' THEN
            a := lo; b := hi;
        ELSE
            m := regexp_match(base, '^([0-9A-Z]+)(?:-([0-9A-Z]+))?$');
            IF m IS NULL THEN
                RAISE EXCEPTION 'the % field has a bad item %', fname, quote_literal(item);
            END IF;
            a := reactor.cron_value(m[1], names, lo, hi, fname);
            IF m[2] IS NOT NULL THEN
                b := reactor.cron_value(m[2], names, lo, hi, fname);
                IF b < a THEN
                    RAISE EXCEPTION 'the % field has a range that runs backwards: %', fname, quote_literal(item);
                END IF;
            ELSIF step IS NOT NULL THEN
                b := hi;  -- a/step: from a to the end
            ELSE
                b := a;
            END IF;
        END IF;
        vals := vals || ARRAY(SELECT generate_series(a, b, coalesce(step, 1)));
    END LOOP;
    IF p_field = 5 THEN  -- 7 is Sunday too
        vals := ARRAY(SELECT CASE WHEN v = 7 THEN 0 ELSE v END FROM unnest(vals) v);
    END IF;
    RETURN ARRAY(SELECT DISTINCT v FROM unnest(vals) v ORDER BY v);
END
$$;

CREATE FUNCTION reactor.cron_value(p_text text, p_names text[], p_lo integer, p_hi integer, p_fname text)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    v integer;
BEGIN
    IF p_text ~ '^[0-9]{1,4}$' THEN
        v := p_text::integer;
    ELSIF p_names IS NOT NULL AND array_position(p_names, p_text) IS NOT NULL THEN
        v := array_position(p_names, p_text) - CASE WHEN p_fname = 'day-of-week' THEN 1 ELSE 0 END;
    ELSE
        RAISE EXCEPTION 'the % field has a bad value %', p_fname, quote_literal(p_text);
    END IF;
    IF v < p_lo OR v > p_hi THEN
        RAISE EXCEPTION 'the % field has % out of range %-%', p_fname, v, p_lo, p_hi;
    END IF;
    RETURN v;
END
$$;

-- An expression parsed: the values of each field, and the two flags the evaluation needs.
CREATE TYPE reactor.cron_spec AS (
    minutes  integer[],
    hours    integer[],
    doms     integer[],
    months   integer[],
    dows     integer[],
    day_and  boolean,   -- either day field starts with *: both must match (else either)
    wall     boolean    -- minute and hour both fixed: wall-clock times (see above)
);

CREATE FUNCTION reactor.cron_parse(p_cron text) RETURNS reactor.cron_spec
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    f text[];
    s reactor.cron_spec;
BEGIN
    f := regexp_split_to_array(btrim(coalesce(p_cron, ''), E' \t'), E'[ \t]+');
    IF cardinality(f) <> 5 OR f[1] = '' THEN
        RAISE EXCEPTION 'it has % fields; a cron expression has 5 (minute hour day-of-month month day-of-week)',
            CASE WHEN f[1] = '' THEN 0 ELSE cardinality(f) END;
    END IF;
    s.minutes := reactor.cron_field(f[1], 1);
    s.hours := reactor.cron_field(f[2], 2);
    s.doms := reactor.cron_field(f[3], 3);
    s.months := reactor.cron_field(f[4], 4);
    s.dows := reactor.cron_field(f[5], 5);
    s.day_and := f[3] LIKE '*%' OR f[5] LIKE '*%';
    s.wall := f[1] NOT LIKE '*%' AND f[2] NOT LIKE '*%';
    RETURN s;
END
$$;

CREATE FUNCTION reactor.cron_day_matches(s reactor.cron_spec, d timestamp) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN s.day_and
                THEN extract(day FROM d)::integer = ANY(s.doms) AND extract(dow FROM d)::integer = ANY(s.dows)
                ELSE extract(day FROM d)::integer = ANY(s.doms) OR extract(dow FROM d)::integer = ANY(s.dows) END
$$;

-- The first time strictly after p_after that the expression names, in the time zone p_tz; NULL if
-- none within 50 years (31 February). Raises on a bad expression or time zone.
CREATE FUNCTION reactor.cron_next(p_cron text, p_tz text, p_after timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    s      reactor.cron_spec := reactor.cron_parse(p_cron);
    l      timestamp;   -- a wall-clock time in p_tz
    t      timestamptz; -- a real time
    stop   timestamptz := p_after + interval '50 years';
    m      integer;
    alt    timestamptz;
BEGIN
    IF p_after IS NULL OR NOT isfinite(p_after) THEN
        RETURN NULL;
    END IF;
    IF s.wall THEN
        -- wall-clock times: search the local calendar, then find the real time
        l := date_trunc('minute', p_after AT TIME ZONE p_tz) + interval '1 minute';
        LOOP
            IF l > stop AT TIME ZONE p_tz THEN
                RETURN NULL;
            END IF;
            IF NOT extract(month FROM l)::integer = ANY(s.months) THEN
                l := date_trunc('month', l) + interval '1 month';
                CONTINUE;
            END IF;
            IF NOT reactor.cron_day_matches(s, l) THEN
                l := date_trunc('day', l) + interval '1 day';
                CONTINUE;
            END IF;
            m := (SELECT min(h) FROM unnest(s.hours) h WHERE h >= extract(hour FROM l));
            IF m IS NULL THEN
                l := date_trunc('day', l) + interval '1 day';
                CONTINUE;
            ELSIF m > extract(hour FROM l) THEN
                l := date_trunc('day', l) + make_interval(hours => m);
            END IF;
            m := (SELECT min(x) FROM unnest(s.minutes) x WHERE x >= extract(minute FROM l));
            IF m IS NULL THEN
                l := date_trunc('hour', l) + interval '1 hour';
                CONTINUE;
            END IF;
            l := date_trunc('hour', l) + make_interval(mins => m);
            -- a time in a DST gap does not exist: the first minute after the gap
            WHILE (l AT TIME ZONE p_tz) AT TIME ZONE p_tz <> l LOOP
                l := l + interval '1 minute';
            END LOOP;
            t := l AT TIME ZONE p_tz;
            -- a time that occurs twice: the first (PostgreSQL reads it as the later one)
            FOREACH alt IN ARRAY ARRAY[t - interval '1 hour', t - interval '30 minutes'] LOOP
                IF alt AT TIME ZONE p_tz = l THEN
                    t := alt;
                    EXIT;
                END IF;
            END LOOP;
            IF t > p_after THEN
                RETURN t;
            END IF;
            l := l + interval '1 minute';
        END LOOP;
    END IF;
    -- real minutes, matched against their local time
    t := date_trunc('minute', p_after) + interval '1 minute';
    LOOP
        IF t > stop THEN
            RETURN NULL;
        END IF;
        l := t AT TIME ZONE p_tz;
        IF NOT extract(month FROM l)::integer = ANY(s.months) THEN
            t := greatest(t + interval '1 minute', (date_trunc('month', l) + interval '1 month') AT TIME ZONE p_tz);
            CONTINUE;
        END IF;
        IF NOT reactor.cron_day_matches(s, l) THEN
            t := greatest(t + interval '1 minute', (date_trunc('day', l) + interval '1 day') AT TIME ZONE p_tz);
            CONTINUE;
        END IF;
        IF NOT extract(hour FROM l)::integer = ANY(s.hours) THEN
            -- to the next hour in real time (the repeated hour of a DST change is visited)
            t := t + make_interval(mins => 60 - extract(minute FROM l)::integer);
            CONTINUE;
        END IF;
        m := (SELECT min(x) FROM unnest(s.minutes) x WHERE x >= extract(minute FROM l));
        IF m IS NULL THEN
            t := t + make_interval(mins => 60 - extract(minute FROM l)::integer);
            CONTINUE;
        END IF;
        IF m > extract(minute FROM l) THEN
            t := t + make_interval(mins => m - extract(minute FROM l)::integer);
            CONTINUE;  -- the hour may have changed under a DST change: check again
        END IF;
        RETURN t;
    END LOOP;
END
$$;
COMMENT ON FUNCTION reactor.cron_next(text, text, timestamptz) IS
    'The first time after p_after named by a 5-field cron expression in time zone p_tz (NULL: none in 50 years).';

-- Why a cron expression cannot be used (NULL: it can).
CREATE FUNCTION reactor.cron_problem(p_cron text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    PERFORM reactor.cron_parse(p_cron);
    RETURN NULL;
EXCEPTION WHEN raise_exception OR numeric_value_out_of_range OR invalid_text_representation THEN
    RETURN SQLERRM;
END
$$;

-- Schedules ---------------------------------------------------------------------------------------

CREATE TABLE public.job_schedules (
    name          text PRIMARY KEY,
    cron          text NOT NULL,
    timezone      text NOT NULL DEFAULT 'UTC',
    job_type      text NOT NULL,
    priority      text NOT NULL DEFAULT 'medium',
    payload       jsonb NOT NULL DEFAULT '{}'::jsonb,
    enabled       boolean NOT NULL DEFAULT true,
    catch_up      text NOT NULL DEFAULT 'latest',
    next_run_at   timestamptz,
    last_run_at   timestamptz,
    jobs_created  bigint NOT NULL DEFAULT 0,
    slots_skipped bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Backstops: the trigger below raises clearer errors first.
    CONSTRAINT "job_schedules.name must be letters, digits, _ . or -"
        CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    CONSTRAINT "job_schedules.priority must be high, medium or low" CHECK (priority IN ('high', 'medium', 'low')),
    CONSTRAINT "job_schedules.catch_up must be latest, all or none" CHECK (catch_up IN ('latest', 'all', 'none')),
    CONSTRAINT "job_schedules.payload must be a JSON object" CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT "job_schedules.job_type must be a known job type" FOREIGN KEY (job_type)
        REFERENCES public.job_types (name) ON UPDATE CASCADE
);
CREATE INDEX job_schedules_next_idx ON public.job_schedules (next_run_at) WHERE enabled;
-- Schedules are the operators' (their jobs are made by the system): on a database with Supabase's
-- roles, whose default privileges give anon and authenticated everything on a new public table,
-- they get nothing here (service_role keeps what Supabase gives it).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE format('REVOKE ALL ON TABLE public.job_schedules FROM %I', r);
        END IF;
    END LOOP;
END
$$;
COMMENT ON TABLE public.job_schedules IS
    'Periodic jobs: each slot of cron (5 fields, in timezone) makes one job of job_type with payload '
    '({{date}}: the slot''s date in timezone, {{slot}}: the slot time in UTC, ISO). catch_up says what '
    'happens to slots missed while no reactor ran: latest (run the newest), all (run each), none (run '
    'none). next_run_at, last_run_at, jobs_created and slots_skipped are kept by the system.';
COMMENT ON COLUMN public.job_schedules.next_run_at IS 'The next slot (NULL while disabled). Kept by the system.';
COMMENT ON COLUMN public.job_schedules.last_run_at IS 'The slot (or run-now time) of the last job made. Kept by the system.';

-- a slot as text: UTC, ISO 8601, seconds (and a fraction when there is one)
CREATE FUNCTION reactor.slot_text(p_slot timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(p_slot AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN extract(microseconds FROM p_slot)::bigint % 1000000 <> 0
                THEN to_char(p_slot AT TIME ZONE 'UTC', '.US') ELSE '' END
        || 'Z'
$$;

-- {{date}} and {{slot}} replaced in every string value of a payload, at any depth
CREATE FUNCTION reactor.expand_payload(p jsonb, p_date text, p_slot text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(p)
        WHEN 'string' THEN to_jsonb(replace(replace(p #>> '{}', '{{date}}', p_date), '{{slot}}', p_slot))
        WHEN 'object' THEN coalesce((SELECT jsonb_object_agg(e.key, reactor.expand_payload(e.value, p_date, p_slot))
                                       FROM jsonb_each(p) e), '{}'::jsonb)
        WHEN 'array' THEN coalesce((SELECT jsonb_agg(reactor.expand_payload(a.value, p_date, p_slot) ORDER BY a.i)
                                      FROM jsonb_array_elements(p) WITH ORDINALITY a(value, i)), '[]'::jsonb)
        ELSE p END
$$;

-- Whether this transaction is the system's own (fire_schedules, run_schedule_now): only it may
-- write next_run_at, last_run_at and the counts.
CREATE FUNCTION reactor.schedule_writer() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('reactor.schedule_writer', true), '') = pg_current_xact_id()::text
$$;

CREATE FUNCTION reactor.job_schedules_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text;
    col     text;
BEGIN
    IF reactor.schedule_writer() THEN
        RETURN NEW;
    END IF;
    IF NEW.name IS NULL OR NEW.name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'job_schedules.name must be 1 to 63 letters, digits, _ . or - (starting with a letter or digit), got %',
            quote_nullable(NEW.name)
            USING ERRCODE = 'check_violation', COLUMN = 'name', TABLE = 'job_schedules';
    END IF;
    problem := reactor.cron_problem(NEW.cron);
    IF NEW.cron IS NULL OR problem IS NOT NULL THEN
        RAISE EXCEPTION 'job_schedules.cron must be a 5-field cron expression (minute hour day-of-month month day-of-week), got %: %',
            quote_nullable(NEW.cron), coalesce(problem, 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'cron', TABLE = 'job_schedules';
    END IF;
    IF TG_OP = 'INSERT' OR NEW.timezone IS DISTINCT FROM OLD.timezone THEN
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names WHERE name = NEW.timezone) THEN
            RAISE EXCEPTION 'job_schedules.timezone must be a time zone name such as UTC or Asia/Kolkata, got %',
                quote_nullable(NEW.timezone)
                USING ERRCODE = 'check_violation', COLUMN = 'timezone', TABLE = 'job_schedules';
        END IF;
    END IF;
    IF NEW.job_type IS NULL OR NOT EXISTS (SELECT 1 FROM public.job_types t WHERE t.name = NEW.job_type) THEN
        RAISE EXCEPTION 'job_schedules.job_type % is not a known job type; known: % (add one with INSERT INTO job_types)',
            quote_nullable(NEW.job_type), (SELECT string_agg(name, ', ' ORDER BY name) FROM public.job_types)
            USING ERRCODE = 'foreign_key_violation', COLUMN = 'job_type', TABLE = 'job_schedules';
    END IF;
    IF NEW.priority IS NULL OR NEW.priority NOT IN ('high', 'medium', 'low') THEN
        RAISE EXCEPTION 'job_schedules.priority must be high, medium or low, got %', quote_nullable(NEW.priority)
            USING ERRCODE = 'check_violation', COLUMN = 'priority', TABLE = 'job_schedules';
    END IF;
    IF NEW.catch_up IS NULL OR NEW.catch_up NOT IN ('latest', 'all', 'none') THEN
        RAISE EXCEPTION 'job_schedules.catch_up must be latest, all or none, got %', quote_nullable(NEW.catch_up)
            USING ERRCODE = 'check_violation', COLUMN = 'catch_up', TABLE = 'job_schedules';
    END IF;
    IF NEW.payload IS NULL OR jsonb_typeof(NEW.payload) <> 'object' THEN
        RAISE EXCEPTION 'job_schedules.payload must be a JSON object, got %', coalesce(jsonb_typeof(NEW.payload), 'NULL')
            USING ERRCODE = 'check_violation', COLUMN = 'payload', TABLE = 'job_schedules';
    END IF;
    problem := reactor.payload_problem(
        NEW.payload, (SELECT t.input_field FROM public.job_types t WHERE t.name = NEW.job_type));
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'job_schedules.%', substr(problem, length('jobs.') + 1)
            USING ERRCODE = 'check_violation', COLUMN = 'payload', TABLE = 'job_schedules';
    END IF;
    IF NEW.enabled IS NULL THEN
        RAISE EXCEPTION 'job_schedules.enabled must be true or false, got NULL'
            USING ERRCODE = 'not_null_violation', COLUMN = 'enabled', TABLE = 'job_schedules';
    END IF;
    -- what the system keeps
    IF TG_OP = 'INSERT' THEN
        col := CASE WHEN NEW.next_run_at IS NOT NULL THEN 'next_run_at'
                    WHEN NEW.last_run_at IS NOT NULL THEN 'last_run_at'
                    WHEN NEW.jobs_created <> 0 THEN 'jobs_created'
                    WHEN NEW.slots_skipped <> 0 THEN 'slots_skipped' END;
    ELSE
        col := CASE WHEN NEW.next_run_at IS DISTINCT FROM OLD.next_run_at THEN 'next_run_at'
                    WHEN NEW.last_run_at IS DISTINCT FROM OLD.last_run_at THEN 'last_run_at'
                    WHEN NEW.jobs_created IS DISTINCT FROM OLD.jobs_created THEN 'jobs_created'
                    WHEN NEW.slots_skipped IS DISTINCT FROM OLD.slots_skipped THEN 'slots_skipped' END;
    END IF;
    IF col IS NOT NULL THEN
        RAISE EXCEPTION 'job_schedules.% is kept by the system and cannot be set (change cron, timezone or enabled instead)', col
            USING ERRCODE = 'check_violation', COLUMN = col, TABLE = 'job_schedules';
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.created_at := now();
    END IF;
    NEW.updated_at := now();
    -- the next slot: from now on when the schedule is new, enabled again, or its times changed
    -- (slots missed while disabled are not caught up)
    IF NOT NEW.enabled THEN
        NEW.next_run_at := NULL;
    ELSIF TG_OP = 'INSERT' OR NOT OLD.enabled OR NEW.cron IS DISTINCT FROM OLD.cron
          OR NEW.timezone IS DISTINCT FROM OLD.timezone THEN
        NEW.next_run_at := reactor.cron_next(NEW.cron, NEW.timezone, now());
        IF NEW.next_run_at IS NULL THEN
            RAISE EXCEPTION 'job_schedules.cron % names no time in the next 50 years', quote_literal(NEW.cron)
                USING ERRCODE = 'check_violation', COLUMN = 'cron', TABLE = 'job_schedules';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER job_schedules_before_write
    BEFORE INSERT OR UPDATE ON public.job_schedules
    FOR EACH ROW EXECUTE FUNCTION reactor.job_schedules_before_write();

-- A schedule changed by anyone but the system: the reactors re-read the earliest next run.
CREATE FUNCTION reactor.notify_schedules() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT reactor.schedule_writer() THEN
        PERFORM pg_notify('reactor_schedules', '{}');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_schedules_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.job_schedules
    FOR EACH STATEMENT EXECUTE FUNCTION reactor.notify_schedules();

-- The job of one slot (or of a run-now): NULL when that slot's job exists already.
CREATE FUNCTION reactor.schedule_job(s public.job_schedules, p_slot timestamptz) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    slot_text text := reactor.slot_text(p_slot);
    job       uuid;
BEGIN
    INSERT INTO reactor.jobs (job_type, priority, payload, schedule_name, idempotency_key)
    VALUES (s.job_type, s.priority,
            reactor.expand_payload(s.payload, to_char(p_slot AT TIME ZONE s.timezone, 'YYYY-MM-DD'), slot_text),
            s.name, 'schedule:' || s.name || ':' || slot_text)
    ON CONFLICT DO NOTHING
    RETURNING id INTO job;
    RETURN job;
END
$$;

-- How many slots lie in [p_from, p_to), at most p_cap.
CREATE FUNCTION reactor.count_slots(p_cron text, p_tz text, p_from timestamptz, p_to timestamptz, p_cap integer)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    slot timestamptz := p_from;
    n    bigint := 0;
BEGIN
    WHILE slot IS NOT NULL AND slot < p_to AND n < p_cap LOOP
        n := n + 1;
        slot := reactor.cron_next(p_cron, p_tz, slot);
    END LOOP;
    RETURN n;
END
$$;

-- Make the jobs of every slot due by p_now, for every enabled schedule, and move next_run_at past
-- p_now. Safe to run at once from any number of sessions: each schedule is taken by one of them
-- (FOR UPDATE SKIP LOCKED) and its slot advanced in the same transaction as its job, so a slot makes
-- exactly one job. Slots missed (the schedule was due while no reactor ran) follow catch_up:
--   latest: the newest slot due makes a job, the older are skipped;
--   all:    every slot makes its job, oldest first (at most p_max_slots a call; the next call goes on);
--   none:   a slot makes a job only if it is less than p_grace old; older ones are skipped.
-- Returns one row per slot acted on: the job made (NULL: skipped, or its job existed already).
CREATE FUNCTION reactor.fire_schedules(p_now timestamptz DEFAULT now(),
                                       p_grace interval DEFAULT '1 minute',
                                       p_max_slots integer DEFAULT 1000)
RETURNS TABLE (schedule_name text, slot timestamptz, job_id uuid, fired boolean)
LANGUAGE plpgsql AS $$
DECLARE
    s        public.job_schedules;
    cur      timestamptz;
    nxt      timestamptz;
    latest   timestamptz;
    win      interval;
    made     bigint;
    skipped  bigint;
    last_run timestamptz;
    n        integer;
BEGIN
    PERFORM set_config('reactor.schedule_writer', pg_current_xact_id()::text, true);
    FOR s IN
        SELECT * FROM public.job_schedules js
         WHERE js.enabled AND js.next_run_at <= p_now
         ORDER BY js.next_run_at
           FOR UPDATE SKIP LOCKED
    LOOP
        made := 0;
        skipped := 0;
        last_run := s.last_run_at;
        IF s.catch_up = 'all' THEN
            cur := s.next_run_at;
            n := 0;
            WHILE cur IS NOT NULL AND cur <= p_now AND n < p_max_slots LOOP
                job_id := reactor.schedule_job(s, cur);
                schedule_name := s.name; slot := cur; fired := job_id IS NOT NULL;
                RETURN NEXT;
                IF job_id IS NOT NULL THEN made := made + 1; last_run := cur; END IF;
                n := n + 1;
                cur := reactor.cron_next(s.cron, s.timezone, cur);
            END LOOP;
            nxt := cur;
        ELSE
            -- the newest slot due: looked for back from p_now, in widening windows
            latest := NULL;
            win := interval '1 hour';
            LOOP
                cur := reactor.cron_next(s.cron, s.timezone, greatest(p_now - win, s.next_run_at - interval '1 second'));
                IF cur IS NOT NULL AND cur <= p_now THEN
                    WHILE cur IS NOT NULL AND cur <= p_now LOOP
                        latest := cur;
                        cur := reactor.cron_next(s.cron, s.timezone, cur);
                    END LOOP;
                    EXIT;
                END IF;
                EXIT WHEN p_now - win <= s.next_run_at;
                win := win * 4;
            END LOOP;
            nxt := cur;
            latest := coalesce(latest, s.next_run_at);
            -- the slots passed over: those due before the newest (counted up to 1,000 a call)
            skipped := reactor.count_slots(s.cron, s.timezone, s.next_run_at, latest, 1000);
            IF s.catch_up = 'latest' OR p_now - latest < p_grace THEN
                job_id := reactor.schedule_job(s, latest);
                schedule_name := s.name; slot := latest; fired := job_id IS NOT NULL;
                RETURN NEXT;
                IF job_id IS NOT NULL THEN made := 1; last_run := latest; END IF;
            ELSE
                skipped := skipped + 1;
                schedule_name := s.name; slot := latest; job_id := NULL; fired := false;
                RETURN NEXT;
            END IF;
        END IF;
        UPDATE public.job_schedules js
           SET next_run_at = nxt, last_run_at = last_run,
               jobs_created = js.jobs_created + made, slots_skipped = js.slots_skipped + skipped,
               updated_at = now()
         WHERE js.name = s.name;
    END LOOP;
END
$$;
COMMENT ON FUNCTION reactor.fire_schedules(timestamptz, interval, integer) IS
    'Make the jobs of every schedule slot due by p_now (exactly one per slot, from any number of sessions), '
    'apply catch_up to missed slots, and move next_run_at on. The reactor calls it; psql may too.';

-- One job of a schedule now, outside its slots (its next slot is unchanged). Returns the job.
CREATE FUNCTION reactor.run_schedule_now(p_name text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    s   public.job_schedules;
    job uuid;
BEGIN
    PERFORM set_config('reactor.schedule_writer', pg_current_xact_id()::text, true);
    SELECT * INTO s FROM public.job_schedules js WHERE js.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    job := reactor.schedule_job(s, clock_timestamp());
    UPDATE public.job_schedules js
       SET last_run_at = clock_timestamp(), jobs_created = js.jobs_created + 1, updated_at = now()
     WHERE js.name = p_name;
    RETURN job;
END
$$;

-- The earliest next run of any enabled schedule (the reactor sleeps until then).
CREATE FUNCTION reactor.next_schedule_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(js.next_run_at) FROM public.job_schedules js WHERE js.enabled
$$;

INSERT INTO reactor.schema_migrations (version, name) VALUES (11, 'schedules');
