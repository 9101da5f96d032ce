-- Rollback of 0002_ops: removes everything 0002 created, and nothing else.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0002_ops.sql
-- A pause in force stays in force (max_concurrent_renders = 0); only the remembered value is lost.

DROP TRIGGER IF EXISTS job_queue_config_remember_pause ON public.job_queue_config;
DROP FUNCTION IF EXISTS reactor.remember_pause();
DROP TABLE IF EXISTS reactor.paused_limits;
DELETE FROM reactor.schema_migrations WHERE version = 2;
