-- Rollback of 0001_jobs: removes everything 0001 created, and nothing else.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0001_jobs.sql
-- This deletes every job and event. Take a dump first if they matter.

DROP FUNCTION IF EXISTS public.update_queue_positions();
DROP FUNCTION IF EXISTS public.get_queue_stats();
DROP VIEW IF EXISTS public.job_events;
DROP VIEW IF EXISTS public.jobs;
DROP TABLE IF EXISTS reactor.jobs;
DROP TABLE IF EXISTS public.job_queue_config;
DROP TABLE IF EXISTS public.job_types;
DROP SCHEMA IF EXISTS reactor CASCADE;
