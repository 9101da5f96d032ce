-- Rollback of 0010_positions: jobs.queue_position counts the jobs ahead of each row again.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0010_positions.sql

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
       j.lease_expires_at
FROM reactor.jobs j;

DROP FUNCTION reactor.queue_position_at(smallint, timestamptz, bigint, uuid[], bigint[], bigint[], uuid[], uuid[], uuid[],
                                         uuid[], uuid[], uuid[], uuid[]);
DROP FUNCTION reactor.queue_ends_positions(integer);
DROP FUNCTION reactor.queue_ends_keys(integer);
DROP FUNCTION reactor.queue_band_keys(smallint, boolean);
DROP FUNCTION reactor.queue_split(smallint);
DROP FUNCTION reactor.queue_above();
DROP FUNCTION reactor.queue_counts();
DROP INDEX reactor.jobs_queue_key_idx;
DROP FUNCTION reactor.queue_key(smallint, timestamptz, bigint);
ALTER TABLE reactor.jobs DROP CONSTRAINT "jobs.job_no must be between 1 and 2^56 - 1 (queue keys hold 7 bytes of it)";
DELETE FROM reactor.schema_migrations WHERE version = 10;
