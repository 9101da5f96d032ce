-- 0002_ops: what the runbook commands need to remember.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0002_ops.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 1` (sql/rollback/0002_ops.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- Pausing is `max_concurrent_renders = 0` (README, "Configuration"). So that a pause can be undone
-- to the value it replaced, whoever sets it to 0 (`reactor pause`, `reactor config set`, or a plain
-- SQL UPDATE) leaves the previous value in reactor.paused_limits; setting it above 0 again (`reactor
-- resume`, or any UPDATE) clears the row. `reactor resume` restores the value kept here.

CREATE TABLE reactor.paused_limits (
    id                     boolean PRIMARY KEY DEFAULT true CHECK (id),
    max_concurrent_renders integer NOT NULL CHECK (max_concurrent_renders > 0),
    paused_at              timestamptz NOT NULL DEFAULT now(),
    paused_by              text NOT NULL
);
COMMENT ON TABLE reactor.paused_limits IS
    'While dispatch is paused (job_queue_config.max_concurrent_renders = 0): the value the pause '
    'replaced, when and by whom. Kept by a trigger on job_queue_config; read by `reactor resume`.';

-- SECURITY DEFINER: a role that may update job_queue_config (e.g. Supabase's service_role) needs no
-- rights on reactor.paused_limits.
CREATE FUNCTION reactor.remember_pause() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.max_concurrent_renders = 0 AND OLD.max_concurrent_renders > 0 THEN
        INSERT INTO reactor.paused_limits (max_concurrent_renders, paused_by)
        VALUES (OLD.max_concurrent_renders, reactor.current_actor())
        ON CONFLICT (id) DO UPDATE
            SET max_concurrent_renders = EXCLUDED.max_concurrent_renders,
                paused_at = EXCLUDED.paused_at, paused_by = EXCLUDED.paused_by;
    ELSIF NEW.max_concurrent_renders > 0 THEN
        DELETE FROM reactor.paused_limits;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_queue_config_remember_pause
    AFTER UPDATE OF max_concurrent_renders ON public.job_queue_config
    FOR EACH ROW EXECUTE FUNCTION reactor.remember_pause();

INSERT INTO reactor.schema_migrations (version, name) VALUES (2, 'ops');
