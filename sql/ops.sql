-- Named queries of the runbook commands (reactor/ops/runbook.py). Parameters are %(name)s.
-- The commands work on reactor.jobs directly: they run as the owner of the schema, like the reactor.

-- name: set_actor
SELECT set_config('reactor.actor', %(actor)s, true)

-- name: features
SELECT to_regclass('reactor.paused_limits') IS NOT NULL AS pause_memory,
       to_regclass('reactor.supabase_settings') IS NOT NULL AS supabase

-- name: queue_stats
SELECT * FROM public.get_queue_stats()

-- name: effective_limits
SELECT * FROM reactor.effective_limits(now())

-- name: config
SELECT * FROM public.job_queue_config

-- name: supabase_settings
SELECT allow_user_high_priority, user_jobs_per_minute FROM reactor.supabase_settings

-- name: columns
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum

-- name: reactors
SELECT id, hostname, pid, version, started_at, heartbeat_at, circuit_state, circuit_since,
       extract(epoch FROM now() - heartbeat_at)::double precision AS silent_seconds
  FROM reactor.reactors
 ORDER BY heartbeat_at DESC, id

-- name: oldest_queued
-- the oldest queued job, read from the two queue indexes once per priority (never a table scan)
SELECT o.id, o.job_type, o.priority, o.created_at, o.run_after,
       extract(epoch FROM now() - o.created_at)::double precision AS age_seconds
  FROM (VALUES (0::smallint), (1::smallint), (2::smallint)) AS r(rank),
       LATERAL (
           (SELECT j.id, j.job_type, j.priority, j.created_at, j.run_after FROM reactor.jobs j
             WHERE j.status = 'queued' AND j.renderer = 'manim' AND j.priority_rank = r.rank
             ORDER BY j.created_at LIMIT 1)
           UNION ALL
           (SELECT j.id, j.job_type, j.priority, j.created_at, j.run_after FROM reactor.jobs j
             WHERE j.status = 'queued' AND j.renderer <> 'manim' AND j.priority_rank = r.rank
             ORDER BY j.created_at LIMIT 1)
       ) AS o
 ORDER BY o.created_at
 LIMIT 1

-- name: pause_state
SELECT max_concurrent_renders AS previous, paused_at, paused_by FROM reactor.paused_limits

-- name: list_jobs
-- positions from the jobs view, which reads what they need once for the statement (a job waiting
-- for its run_after has none yet)
SELECT j.id, j.job_type, j.priority, j.status, v.queue_position,
       j.user_id, j.renderer, j.retry_count, j.max_retries, j.attempt, j.locked_by,
       j.error_category, j.error_message, j.created_at, j.started_at, j.completed_at, j.run_after
  FROM reactor.jobs j JOIN public.jobs v ON v.id = j.id
 WHERE (%(status)s::text IS NULL OR j.status = %(status)s::text)
   AND (%(job_type)s::text IS NULL OR j.job_type = %(job_type)s::text)
   AND (%(user_id)s::uuid IS NULL OR j.user_id = %(user_id)s::uuid)
 ORDER BY j.created_at DESC, j.job_no DESC
 LIMIT %(limit)s

-- name: get_job
SELECT * FROM public.jobs WHERE id = %(id)s

-- name: job_events
SELECT seq, kind, status, old_status, priority, retry_count, error_category, actor, at
  FROM reactor.events
 WHERE job_id = %(id)s
 ORDER BY seq

-- name: lock_job
SELECT id, status, locked_by, attempt FROM reactor.jobs WHERE id = %(id)s FOR UPDATE

-- name: retry_job
-- a fresh start: the full retry allowance again, runnable now, no trace of the last failure on the
-- row (job_events keeps the history); attempt keeps counting so old leases never match again
UPDATE reactor.jobs
   SET status = 'queued', retry_count = 0, run_after = now(), started_at = NULL, result = NULL,
       error_category = NULL, error_message = NULL, error_details = NULL
 WHERE id = %(id)s AND status IN ('failed', 'cancelled')
RETURNING id

-- name: retry_failed_since
WITH f AS (
    SELECT j.id, j.error_category, j.error_message, j.completed_at
      FROM reactor.jobs j
     WHERE j.status = 'failed' AND j.completed_at >= now() - make_interval(secs => %(since_s)s)
       FOR UPDATE
)
UPDATE reactor.jobs j
   SET status = 'queued', retry_count = 0, run_after = now(), started_at = NULL, result = NULL,
       error_category = NULL, error_message = NULL, error_details = NULL
  FROM f
 WHERE j.id = f.id AND j.status = 'failed'
RETURNING j.id, j.job_type, j.priority, f.completed_at AS failed_at, f.error_category AS was_category,
          f.error_message AS was_message

-- name: cancel_job
UPDATE reactor.jobs SET status = 'cancelled'
 WHERE id = %(id)s AND status IN ('queued', 'processing')
RETURNING id

-- name: sweep
SELECT * FROM reactor.sweep(make_interval(secs => %(grace_s)s), make_interval(secs => %(orphan_s)s))

-- name: set_max_renders
UPDATE public.job_queue_config SET max_concurrent_renders = %(n)s RETURNING max_concurrent_renders

-- name: submit
-- priority: the column's default when not given (an explicit NULL would be refused)
INSERT INTO public.jobs (job_type, priority, user_id, payload)
VALUES (%(job_type)s, coalesce(%(priority)s::text, 'medium'), %(user_id)s::uuid,
        coalesce(%(payload)s::jsonb,
                 jsonb_build_object(coalesce((SELECT t.input_field FROM public.job_types t
                                               WHERE t.name = %(job_type)s::text), 'input'),
                                    %(input)s::text)))
RETURNING id, job_type, priority, status, queue_position, renderer, user_id, payload, created_at

-- name: server
SELECT current_setting('server_version') AS version, current_user AS "user", current_database() AS database

-- name: smoke_submit
-- reactor smoke: one job submitted as users do (through the public view), high priority
INSERT INTO jobs (job_type, priority, payload, max_retries)
VALUES (%(job_type)s, 'high', %(payload)s, %(max_retries)s)
RETURNING id, status, queue_position

-- name: smoke_read
SELECT id, status, queue_position, result, error_category, error_message, retry_count
  FROM jobs WHERE id = %(id)s

-- name: smoke_cancel
UPDATE jobs SET status = 'cancelled' WHERE id = %(id)s AND status IN ('queued', 'processing')

-- name: demo_submit
-- reactor demo: a sample job, submitted with plain SQL as any client would
INSERT INTO jobs (job_type, priority, payload) VALUES (%(job_type)s, %(priority)s, %(payload)s)
RETURNING id, queue_position

-- name: demo_summary
SELECT queued, processing, completed, failed, round(avg_wait_seconds::numeric, 3) AS avg_wait_s
  FROM get_queue_stats()

-- name: list_schedules
SELECT s.name, s.cron, s.timezone, s.job_type, s.priority, s.payload, s.enabled, s.catch_up,
       s.next_run_at, s.last_run_at, s.jobs_created, s.slots_skipped
  FROM public.job_schedules s
 ORDER BY s.next_run_at NULLS LAST, s.name

-- name: set_schedule_enabled
UPDATE public.job_schedules SET enabled = %(enabled)s WHERE name = %(name)s
RETURNING name, enabled, next_run_at

-- name: run_schedule_now
-- the job made (NULL: no such schedule)
SELECT reactor.run_schedule_now(%(name)s) AS id

-- name: prune_preview
-- what `reactor prune` would delete now: finished jobs older than job_retention (by completed_at,
-- from jobs_completed_idx), and their events
WITH cfg AS (
    SELECT c.job_retention, now() - c.job_retention AS cutoff FROM public.job_queue_config c
), gone AS (
    SELECT j.id, j.status, j.completed_at
      FROM reactor.jobs j, cfg
     WHERE j.completed_at IS NOT NULL AND j.completed_at < cfg.cutoff
       AND j.status IN ('completed', 'failed', 'cancelled')
)
SELECT cfg.job_retention::text AS retention, cfg.cutoff,
       (SELECT count(*) FROM gone) AS jobs,
       (SELECT count(*) FROM gone WHERE gone.status = 'completed') AS completed,
       (SELECT count(*) FROM gone WHERE gone.status = 'failed') AS failed,
       (SELECT count(*) FROM gone WHERE gone.status = 'cancelled') AS cancelled,
       (SELECT min(gone.completed_at) FROM gone) AS oldest,
       (SELECT max(gone.completed_at) FROM gone) AS newest,
       (SELECT count(*) FROM reactor.events e WHERE e.job_id IN (SELECT gone.id FROM gone)) AS events
  FROM cfg

-- name: prune_jobs
SELECT * FROM reactor.prune_jobs(%(limit)s, %(since)s)
