-- Rollback of 0011_schedules: no schedules; jobs lose schedule_name and idempotency_key (the values
-- are lost); a delayed job no longer sends NOTIFY reactor_due. The jobs view is put back as it was.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0011_schedules.sql

DROP FUNCTION reactor.next_schedule_at();
DROP FUNCTION reactor.run_schedule_now(text);
DROP FUNCTION reactor.fire_schedules(timestamptz, interval, integer);
DROP FUNCTION reactor.count_slots(text, text, timestamptz, timestamptz, integer);
DROP FUNCTION reactor.schedule_job(public.job_schedules, timestamptz);
DROP TRIGGER job_schedules_notify ON public.job_schedules;
DROP FUNCTION reactor.notify_schedules();
DROP TRIGGER job_schedules_before_write ON public.job_schedules;
DROP FUNCTION reactor.job_schedules_before_write();
DROP FUNCTION reactor.schedule_writer();
DROP FUNCTION reactor.expand_payload(jsonb, text, text);
DROP FUNCTION reactor.slot_text(timestamptz);
DROP TABLE public.job_schedules;
DROP FUNCTION reactor.cron_problem(text);
DROP FUNCTION reactor.cron_next(text, text, timestamptz);
DROP FUNCTION reactor.cron_day_matches(reactor.cron_spec, timestamp);
DROP FUNCTION reactor.cron_parse(text);
DROP TYPE reactor.cron_spec;
DROP FUNCTION reactor.cron_value(text, text[], integer, integer, text);
DROP FUNCTION reactor.cron_field(text, integer);
DROP TRIGGER jobs_notify_due_update ON reactor.jobs;
DROP TRIGGER jobs_notify_due_insert ON reactor.jobs;
DROP FUNCTION reactor.notify_due();

DROP VIEW public.jobs;
DROP INDEX reactor.jobs_schedule_slot_idx;
ALTER TABLE reactor.jobs DROP COLUMN idempotency_key, DROP COLUMN schedule_name;

-- the view of 0010_positions
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
       j.lease_expires_at
FROM reactor.jobs j;
COMMENT ON VIEW public.jobs IS
    'One row per job. Insert with INSERT INTO jobs (job_type, payload[, priority, user_id]). '
    'queue_position is computed when read (1 = next to start) and NULL unless queued. A multi-row '
    'INSERT ... RETURNING queue_position numbers each row against the queue as it was before the '
    'statement; read the positions again after a batch insert.';

DELETE FROM reactor.schema_migrations WHERE version = 11;
