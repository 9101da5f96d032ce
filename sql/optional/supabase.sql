-- supabase: OPTIONAL hardening for a database run by Supabase (roles anon, authenticated and
-- service_role, and the function auth.uid()). Not a numbered migration: plain `reactor migrate`
-- never applies it, so databases without those roles keep working.
--
-- Apply with `reactor migrate --dsn DSN --supabase` (the numbered migrations first, then this), or
-- by hand after the numbered ones:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/optional/supabase.sql
-- Roll back with `reactor migrate --dsn DSN --down --supabase` (this alone) or `reactor migrate
-- --down` (everything), or by hand with sql/optional/supabase.down.sql.
-- Recorded in reactor.schema_migrations as version 1001, name 'supabase'. Never edit it once
-- released: add a new file instead.
--
-- What it does
--   authenticated  reads its own jobs and their events (user_id = auth.uid()); inserts jobs only for
--                  itself (user_id defaults to auth.uid()), only as queued, only medium or low
--                  priority unless reactor.supabase_settings.allow_user_high_priority, at most
--                  reactor.supabase_settings.user_jobs_per_minute per minute (SQLSTATE PT429, which
--                  PostgREST answers with HTTP 429); may set only job_type, priority, status,
--                  payload and user_id; cannot update or delete. May call get_queue_stats().
--   service_role   everything on jobs, job_types, job_events and job_queue_config (its own
--                  policies, so it does not depend on BYPASSRLS).
--   anon, PUBLIC   nothing on the reactor's objects (Supabase's default privileges grant anon
--                  everything created in schema public: this takes it back).
--   The reactor itself must connect as the owner of the tables (the role that ran the migrations,
--   `postgres` on Supabase): owners are not subject to row level security.
--
-- Row level security on reactor.jobs and reactor.events (public.jobs and public.job_events are
-- security_invoker views, so the policies of the tables apply to whoever reads the views). The
-- triggers that keep the event log, the counters and the NOTIFY write tables users have no rights
-- on, and queue_position() must count every queued job, not only the ones the reader may see: those
-- functions become SECURITY DEFINER with a fixed search_path (their bodies name every table with
-- its schema). The privileges it changes are saved first, and the rollback puts them back as they
-- were.
--
-- For later migrations: CREATE OR REPLACE of one of those functions drops SECURITY DEFINER (check
-- prosecdef when the hardening is applied), and objects created in schema public on Supabase get
-- Supabase's default privileges (anon included) unless the migration revokes them.

DO $$
DECLARE
    missing text[] := ARRAY(
        SELECT r FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) AS r
         WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) ORDER BY r);
BEGIN
    IF to_regprocedure('auth.uid()') IS NULL THEN
        missing := missing || 'function auth.uid()'::text;
    END IF;
    IF cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'the Supabase hardening needs Supabase''s roles and auth.uid(); this database lacks: %',
            array_to_string(missing, ', ')
            USING ERRCODE = 'undefined_object',
                  HINT = 'apply it only to a Supabase database; plain `reactor migrate` needs none of this';
    END IF;
    IF to_regclass('reactor.jobs') IS NULL THEN
        RAISE EXCEPTION 'the Supabase hardening goes on top of the numbered migrations: run `reactor migrate` first'
            USING ERRCODE = 'undefined_table';
    END IF;
END
$$;

-- Settings ---------------------------------------------------------------------------------------

CREATE TABLE reactor.supabase_settings (
    id                       boolean PRIMARY KEY DEFAULT true,
    allow_user_high_priority boolean NOT NULL DEFAULT false,
    user_jobs_per_minute     integer NOT NULL DEFAULT 10,
    CONSTRAINT "supabase_settings holds exactly one row" CHECK (id),
    CONSTRAINT "supabase_settings.user_jobs_per_minute must be 0 (users may not submit) or more"
        CHECK (user_jobs_per_minute >= 0)
);
COMMENT ON TABLE reactor.supabase_settings IS
    'One row. allow_user_high_priority: may signed-in users submit high priority jobs; '
    'user_jobs_per_minute: how many jobs one user may submit per minute (0: none).';
INSERT INTO reactor.supabase_settings DEFAULT VALUES;

-- Privileges as they were, for the rollback ------------------------------------------------------

CREATE TABLE reactor.supabase_saved_acl (
    kind   text NOT NULL,               -- SCHEMA, TABLE or FUNCTION, as GRANT spells it
    object text NOT NULL,               -- the object as GRANT spells it
    col    name NOT NULL DEFAULT '',    -- a column of a TABLE, '' for the object itself
    owner  oid NOT NULL,
    acl    aclitem[],                   -- NULL: the built-in default
    PRIMARY KEY (kind, object, col)
);
COMMENT ON TABLE reactor.supabase_saved_acl IS
    'Privileges of the objects the Supabase hardening changed, as they were before it; its rollback restores them.';

INSERT INTO reactor.supabase_saved_acl (kind, object, owner, acl)
SELECT 'SCHEMA', quote_ident(n.nspname), n.nspowner, n.nspacl
  FROM pg_catalog.pg_namespace n WHERE n.nspname = 'reactor'
UNION ALL
SELECT 'TABLE', c.oid::regclass::text, c.relowner, c.relacl
  FROM pg_catalog.pg_class c
 WHERE c.oid IN ('public.jobs'::regclass, 'public.job_events'::regclass, 'public.job_types'::regclass,
                 'public.job_queue_config'::regclass, 'reactor.jobs'::regclass, 'reactor.events'::regclass)
UNION ALL
SELECT 'FUNCTION', p.oid::regprocedure::text, p.proowner, p.proacl
  FROM pg_catalog.pg_proc p
 WHERE p.oid IN ('public.get_queue_stats()'::regprocedure, 'public.update_queue_positions()'::regprocedure);

INSERT INTO reactor.supabase_saved_acl (kind, object, col, owner, acl)
SELECT 'TABLE', c.oid::regclass::text, a.attname, c.relowner, a.attacl
  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
 WHERE c.oid IN ('public.jobs'::regclass, 'public.job_events'::regclass, 'public.job_types'::regclass,
                 'public.job_queue_config'::regclass, 'reactor.jobs'::regclass, 'reactor.events'::regclass)
   AND a.attnum > 0 AND NOT a.attisdropped AND a.attacl IS NOT NULL;

-- Privileges: a clean slate, then exactly what each role needs ------------------------------------

REVOKE ALL ON SCHEMA reactor FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON TABLE public.jobs, public.job_events, public.job_types, public.job_queue_config,
                    reactor.jobs, reactor.events
    FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON FUNCTION public.get_queue_stats(), public.update_queue_positions()
    FROM PUBLIC, anon, authenticated, service_role;

-- the views are security_invoker: their readers and writers need rights on the tables below too
GRANT USAGE ON SCHEMA reactor TO authenticated, service_role;

GRANT SELECT ON TABLE public.jobs, reactor.jobs TO authenticated;
GRANT INSERT (job_type, priority, status, payload, user_id) ON TABLE public.jobs, reactor.jobs TO authenticated;
GRANT SELECT ON TABLE public.job_events, reactor.events TO authenticated;
GRANT SELECT ON TABLE public.job_types TO authenticated;
GRANT EXECUTE ON FUNCTION public.get_queue_stats(), public.update_queue_positions() TO authenticated;

GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.jobs, reactor.jobs, public.job_types TO service_role;
GRANT SELECT ON TABLE public.job_events, reactor.events TO service_role;
GRANT SELECT, UPDATE ON TABLE public.job_queue_config TO service_role;
GRANT EXECUTE ON FUNCTION public.get_queue_stats(), public.update_queue_positions() TO service_role;

-- Functions that must not run with the caller's rights -------------------------------------------

ALTER FUNCTION reactor.stage_inserts() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reactor.stage_updates() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reactor.stage_deletes() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reactor.sequence_commit() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reactor.queue_position(smallint, timestamptz, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- What a signed-in user may insert ---------------------------------------------------------------

ALTER TABLE reactor.jobs ALTER COLUMN user_id SET DEFAULT auth.uid();

-- Called by the INSERT policy of authenticated: true, or an error that says what is wrong (a policy
-- that is merely false gives only "new row violates row-level security policy").
CREATE FUNCTION reactor.supabase_may_insert(p_user_id uuid, p_status text, p_priority text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me        uuid := auth.uid();
    allow_high boolean;
    per_minute integer;
    recent     bigint;
    oldest     timestamptz;
BEGIN
    IF me IS NULL THEN
        RAISE EXCEPTION 'jobs: not signed in (auth.uid() is NULL): submit jobs with a user''s access token'
            USING ERRCODE = 'insufficient_privilege', TABLE = 'jobs';
    END IF;
    IF p_user_id IS DISTINCT FROM me THEN
        RAISE EXCEPTION 'jobs.user_id must be your own user id (auth.uid() = %), got %',
            me, coalesce(p_user_id::text, 'NULL')
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'user_id', TABLE = 'jobs',
                  HINT = 'leave user_id out: it defaults to your own';
    END IF;
    IF p_status IS DISTINCT FROM 'queued' THEN
        RAISE EXCEPTION 'jobs.status must be queued when you submit a job, got %', quote_nullable(p_status)
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'status', TABLE = 'jobs',
                  HINT = 'leave status out: it defaults to queued';
    END IF;
    SELECT s.allow_user_high_priority, s.user_jobs_per_minute INTO allow_high, per_minute
      FROM reactor.supabase_settings s;
    IF p_priority = 'high' AND NOT coalesce(allow_high, false) THEN
        RAISE EXCEPTION 'jobs.priority high is reserved for the service: submit with medium or low'
            USING ERRCODE = 'insufficient_privilege', COLUMN = 'priority', TABLE = 'jobs',
                  HINT = 'an operator can allow it: UPDATE reactor.supabase_settings SET allow_user_high_priority = true';
    END IF;
    per_minute := coalesce(per_minute, 10);
    -- one user's concurrent inserts queue here, so they cannot all read the same count
    PERFORM pg_advisory_xact_lock(hashtextextended('reactor.user_jobs:' || me::text, 0));
    SELECT count(*), min(j.created_at) INTO recent, oldest
      FROM reactor.jobs j
     WHERE j.user_id = me AND j.created_at > now() - interval '1 minute';
    IF recent >= per_minute THEN
        RAISE EXCEPTION 'too many jobs: at most % per minute per user, and you submitted % in the last minute',
            per_minute, recent
            USING ERRCODE = 'PT429', TABLE = 'jobs',
                  HINT = CASE WHEN per_minute = 0 THEN 'submissions by users are switched off'
                              ELSE format('try again in %s s',
                                          greatest(1, ceil(extract(epoch FROM oldest + interval '1 minute' - now()))))
                         END;
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION reactor.supabase_may_insert(uuid, text, text) IS
    'INSERT policy of authenticated on reactor.jobs: own user_id, queued, no high priority unless allowed, '
    'at most reactor.supabase_settings.user_jobs_per_minute per minute. Raises a clear error, else true.';

-- Row level security -----------------------------------------------------------------------------

ALTER TABLE reactor.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE reactor.events ENABLE ROW LEVEL SECURITY;

CREATE POLICY jobs_read_own ON reactor.jobs FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));
CREATE POLICY jobs_insert_own ON reactor.jobs FOR INSERT TO authenticated
    WITH CHECK (reactor.supabase_may_insert(user_id, status, priority));
CREATE POLICY jobs_service ON reactor.jobs FOR ALL TO service_role
    USING (true) WITH CHECK (true);

CREATE POLICY events_read_own ON reactor.events FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));
CREATE POLICY events_service ON reactor.events FOR SELECT TO service_role
    USING (true);

INSERT INTO reactor.schema_migrations (version, name) VALUES (1001, 'supabase');
