-- Named queries of the live feed (reactor/db/feed.py, for reactor/web/). Parameters are %(name)s. Read-only.

-- name: feed_ping
SELECT 1

-- name: feed_bounds
-- the oldest event still kept (NULL: none kept) and the newest seq ever given
SELECT (SELECT min(e.seq) FROM reactor.events e) AS oldest, c.last_seq
  FROM reactor.counters c

-- name: feed_events
-- events after a seq, in order, with what the feed and the metrics add: the job's video on
-- completion, its creation and start times (for wait and run times), and for a job that became
-- queued to wait for a future run_after (a delayed job, a retry's backoff) that time.
SELECT e.seq, e.job_id, e.kind, e.status, e.old_status, e.priority, e.job_type, e.renderer,
       e.user_id, e.retry_count, e.error_category, e.actor, e.at,
       CASE WHEN e.kind = 'completed' THEN j.result->>'video_url' END AS video_url,
       j.created_at, j.started_at,
       CASE WHEN e.status = 'queued' AND j.run_after > e.at THEN j.run_after END AS scheduled_for
  FROM reactor.events e
  LEFT JOIN reactor.jobs j ON j.id = e.job_id
   AND e.kind IN ('started', 'completed', 'failed', 'retrying', 'inserted', 'requeued')
 WHERE e.seq > %(after)s AND e.seq <= %(upto)s
   AND (%(user_id)s::uuid IS NULL OR e.user_id = %(user_id)s::uuid)
 ORDER BY e.seq
 LIMIT %(limit)s

-- name: feed_follow
-- with no client to send events to: how far the log goes now (upto: at most span seqs past after),
-- and of the events up to there only those this reactor's metrics count (reactor/web/metrics.py): the
-- starts and ends written by its actors, with the job's creation and start times as feed_events
-- joins them. One statement, one snapshot, and seq is given in commit order: every event up to upto
-- is committed. One row with a NULL seq when none of them is this reactor's.
SELECT u.upto, e.seq, e.kind, e.actor, e.at, e.retry_count, e.error_category, j.created_at, j.started_at
  FROM (SELECT least(c.last_seq, %(after)s::bigint + %(span)s::bigint) AS upto FROM reactor.counters c) u
  LEFT JOIN reactor.events e
         ON e.seq > %(after)s::bigint AND e.seq <= u.upto
        AND e.actor = ANY(%(actors)s::text[])
        AND e.kind IN ('started', 'completed', 'failed', 'retrying')
  LEFT JOIN reactor.jobs j ON j.id = e.job_id
 ORDER BY e.seq

-- name: feed_stats
SELECT * FROM public.get_queue_stats()

-- name: feed_recent_jobs
SELECT j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count, j.max_retries,
       j.error_category, j.error_message, j.created_at, j.updated_at, j.started_at, j.completed_at,
       CASE WHEN j.status = 'completed' THEN j.result->>'video_url' END AS video_url,
       CASE WHEN j.status = 'queued' AND j.run_after > now() THEN j.run_after END AS scheduled_for
  FROM reactor.jobs j
 ORDER BY j.created_at DESC
 LIMIT %(limit)s

-- name: feed_queue_head
-- the head of the queue in claim order, numbered: two ordered index scans merged (one per
-- partial index), so a deep queue is not sorted; jobs waiting for their run_after are not in it yet
SELECT q.*, row_number() OVER (ORDER BY q.priority_rank, q.created_at, q.job_no) AS queue_position
  FROM ((SELECT j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count,
                j.max_retries, j.error_category, j.error_message, j.created_at, j.updated_at,
                j.started_at, j.completed_at, NULL::text AS video_url,
                j.priority_rank, j.job_no
           FROM reactor.jobs j
          WHERE j.status = 'queued' AND j.renderer = 'manim' AND j.run_after <= now()
          ORDER BY j.priority_rank, j.created_at, j.job_no
          LIMIT %(limit)s)
        UNION ALL
        (SELECT j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count,
                j.max_retries, j.error_category, j.error_message, j.created_at, j.updated_at,
                j.started_at, j.completed_at, NULL::text AS video_url,
                j.priority_rank, j.job_no
           FROM reactor.jobs j
          WHERE j.status = 'queued' AND j.renderer <> 'manim' AND j.run_after <= now()
          ORDER BY j.priority_rank, j.created_at, j.job_no
          LIMIT %(limit)s)) q
 ORDER BY q.priority_rank, q.created_at, q.job_no
 LIMIT %(limit)s

-- name: feed_user_jobs
-- one user's most recent jobs, with the live position of the queued ones
SELECT j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count, j.max_retries,
       j.error_category, j.error_message, j.created_at, j.updated_at, j.started_at, j.completed_at,
       CASE WHEN j.status = 'completed' THEN j.result->>'video_url' END AS video_url,
       CASE WHEN j.status = 'queued' AND j.run_after > now() THEN j.run_after END AS scheduled_for,
       j.queue_position
  FROM public.jobs j
 WHERE j.user_id = %(user_id)s
 ORDER BY j.created_at DESC
 LIMIT %(limit)s

-- name: feed_user_queue
-- one user's queued jobs, in claim order, with their live positions
SELECT j.id, j.status, j.priority, j.job_type, j.renderer, j.user_id, j.retry_count, j.max_retries,
       j.error_category, j.error_message, j.created_at, j.updated_at, j.started_at, j.completed_at,
       NULL::text AS video_url,
       CASE WHEN j.run_after > now() THEN j.run_after END AS scheduled_for,
       j.queue_position
  FROM public.jobs j
 WHERE j.user_id = %(user_id)s AND j.status = 'queued'
 ORDER BY j.queue_position NULLS LAST, j.run_after
 LIMIT %(limit)s

-- name: feed_positions
-- the jobs by key first (OFFSET 0 keeps the status test out of the scan, or the planner may walk a
-- queued-jobs index and its dead entries: migration 0012)
SELECT j.id, j.queue_position
  FROM (SELECT k.id, k.status, k.queue_position FROM public.jobs k
         WHERE k.id = ANY(%(ids)s::uuid[]) OFFSET 0) j
 WHERE j.status = 'queued'

-- name: feed_metrics
SELECT c.last_seq, c.queued, c.processing, c.completed, c.failed, c.cancelled,
       c.queued_high, c.queued_medium, c.queued_low,
       coalesce(extract(epoch FROM now() - o.at), 0)::double precision AS oldest_queued_age_seconds,
       pg_notification_queue_usage() AS notification_queue_usage,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'name', s.name, 'enabled', s.enabled,
                   'next_run_at', extract(epoch FROM s.next_run_at)::double precision,
                   'last_run_at', extract(epoch FROM s.last_run_at)::double precision,
                   'jobs_created', s.jobs_created, 'slots_skipped', s.slots_skipped) ORDER BY s.name), '[]')
          FROM public.job_schedules s) AS schedules,
       -- jobs completed from the render cache in the last hour (get_queue_stats().renders_saved)
       (SELECT count(*) FROM reactor.jobs j
         WHERE j.completed_at >= now() - interval '1 hour' AND j.status = 'completed'
           AND j.result ? 'cached_from') AS renders_saved_last_hour
  FROM reactor.counters c,
       LATERAL (SELECT min(m.created_at) AS at
                  FROM (VALUES (0::smallint), (1::smallint), (2::smallint)) r(rank),
                  LATERAL ((SELECT j.created_at FROM reactor.jobs j
                             WHERE j.status = 'queued' AND j.renderer = 'manim' AND j.priority_rank = r.rank
                             ORDER BY j.created_at LIMIT 1)
                           UNION ALL
                           (SELECT j.created_at FROM reactor.jobs j
                             WHERE j.status = 'queued' AND j.renderer <> 'manim' AND j.priority_rank = r.rank
                             ORDER BY j.created_at LIMIT 1)) m) o
