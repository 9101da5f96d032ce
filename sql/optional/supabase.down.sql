-- Rollback of the optional Supabase hardening (sql/optional/supabase.sql): removes what it created
-- and puts back what it changed (policies, SECURITY DEFINER, the user_id default, privileges as they
-- were saved in reactor.supabase_saved_acl), and nothing else. Jobs and events are kept.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/optional/supabase.down.sql

DROP POLICY IF EXISTS events_service ON reactor.events;
DROP POLICY IF EXISTS events_read_own ON reactor.events;
DROP POLICY IF EXISTS jobs_service ON reactor.jobs;
DROP POLICY IF EXISTS jobs_insert_own ON reactor.jobs;
DROP POLICY IF EXISTS jobs_read_own ON reactor.jobs;
ALTER TABLE reactor.events DISABLE ROW LEVEL SECURITY;
ALTER TABLE reactor.jobs DISABLE ROW LEVEL SECURITY;

DROP FUNCTION IF EXISTS reactor.supabase_may_insert(uuid, text, text);
ALTER TABLE reactor.jobs ALTER COLUMN user_id DROP DEFAULT;

ALTER FUNCTION reactor.stage_inserts() SECURITY INVOKER RESET search_path;
ALTER FUNCTION reactor.stage_updates() SECURITY INVOKER RESET search_path;
ALTER FUNCTION reactor.stage_deletes() SECURITY INVOKER RESET search_path;
ALTER FUNCTION reactor.sequence_commit() SECURITY INVOKER RESET search_path;
ALTER FUNCTION reactor.queue_position(smallint, timestamptz, bigint) SECURITY INVOKER RESET search_path;

-- Privileges back to what they were: revoke everything from the roles the hardening dealt with, then
-- grant again what the saved lists held (NULL stands for the built-in default, e.g. EXECUTE to PUBLIC
-- on functions).
DO $$
DECLARE
    r record;
    g record;
BEGIN
    FOR r IN SELECT * FROM reactor.supabase_saved_acl WHERE col = '' LOOP
        EXECUTE format('REVOKE ALL ON %s %s FROM PUBLIC, anon, authenticated, service_role', r.kind, r.object);
    END LOOP;
    FOR r IN SELECT * FROM reactor.supabase_saved_acl ORDER BY kind, object, col LOOP
        FOR g IN
            SELECT a.privilege_type, a.grantee, a.is_grantable
              FROM aclexplode(coalesce(r.acl, acldefault(
                       CASE WHEN r.col <> '' THEN 'c' WHEN r.kind = 'SCHEMA' THEN 'n'
                            WHEN r.kind = 'FUNCTION' THEN 'f' ELSE 'r' END::"char", r.owner))) a
             WHERE a.grantee = 0
                OR a.grantee IN (SELECT oid FROM pg_catalog.pg_roles
                                  WHERE rolname IN ('anon', 'authenticated', 'service_role'))
        LOOP
            EXECUTE format('GRANT %s%s ON %s %s TO %s%s',
                g.privilege_type,
                CASE WHEN r.col <> '' THEN format(' (%I)', r.col) ELSE '' END,
                r.kind, r.object,
                CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END LOOP;
END
$$;

DROP TABLE IF EXISTS reactor.supabase_saved_acl;
DROP TABLE IF EXISTS reactor.supabase_settings;
DELETE FROM reactor.schema_migrations WHERE version = 1001;
