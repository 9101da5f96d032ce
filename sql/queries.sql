-- Named queries of the reactor, loaded once by reactor/db/store.py. Parameters are %(name)s.

-- name: finish_and_claim
-- the outcomes written, the render cache settled, the claim made, each claimed job with its cache key
-- and the cache's word on it (0013), and one journal write for all of it (0016)
SELECT * FROM reactor.run_cycle(%(batch)s::jsonb, %(reactor)s, %(max)s, make_interval(secs => %(lease_s)s),
                                %(clock)s, %(fallback)s::jsonb)

-- name: release_strays
-- jobs this reactor holds but neither renders nor has an outcome for (it could not read the claim
-- that took them, or its dispatcher restarted): back to the queue without spending a retry while
-- free requeues remain, failed after that
UPDATE reactor.jobs j
   SET status = CASE WHEN j.attempt - 1 - j.retry_count < %(free)s THEN 'queued' ELSE 'failed' END,
       error_category = 'UNKNOWN',
       error_message = %(reason)s
 WHERE j.locked_by = %(reactor)s AND j.status = 'processing' AND j.lease_expires_at IS NOT NULL
   AND NOT (j.id = ANY(%(known)s::uuid[]))
RETURNING j.id, j.status

-- name: renew_leases
UPDATE reactor.jobs j
   SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
  FROM unnest(%(ids)s::uuid[], %(attempts)s::integer[]) AS h(id, attempt)
 WHERE j.id = h.id AND j.attempt = h.attempt AND j.status = 'processing' AND j.locked_by = %(reactor)s
RETURNING j.id

-- name: still_held
SELECT h.id
  FROM unnest(%(ids)s::uuid[], %(attempts)s::integer[]) AS h(id, attempt)
  JOIN reactor.jobs j ON j.id = h.id AND j.attempt = h.attempt
 WHERE j.status = 'processing' AND j.locked_by = %(reactor)s

-- name: sweep
SELECT * FROM reactor.sweep(make_interval(secs => %(grace_s)s), make_interval(secs => %(orphan_s)s),
                            %(since)s)

-- name: next_wakeups
-- leases from %(since)s on (NULL: all; 'infinity': none, when only the due time is wanted)
SELECT w.next_due, w.next_lease_expiry, now() AS db_now, l.paused
  FROM reactor.next_wakeups(%(since)s) w, reactor.effective_limits() l

-- name: heartbeat
INSERT INTO reactor.reactors (id, hostname, pid, version)
VALUES (%(reactor)s, %(hostname)s, %(pid)s, %(version)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()

-- name: set_circuit
WITH upd AS (
    UPDATE reactor.reactors SET circuit_state = %(state)s, circuit_since = %(since)s
     WHERE id = %(reactor)s RETURNING id, circuit_state, circuit_since)
SELECT pg_notify('reactor_fleet', json_build_object('reactor', id, 'circuit', circuit_state,
                                                    'since', circuit_since)::text)
  FROM upd

-- name: unregister
DELETE FROM reactor.reactors WHERE id = %(reactor)s

-- name: forget_dead_reactors
DELETE FROM reactor.reactors WHERE heartbeat_at < now() - interval '1 day'

-- name: prune
SELECT * FROM reactor.prune(%(since)s, %(totals_from)s)

-- name: fire_schedules
-- every slot due by the database's clock (or %(now)s, a test's injected clock): exactly one job each
SELECT f.schedule_name, f.slot, f.job_id, f.fired FROM reactor.fire_schedules(coalesce(%(now)s, now())) f

-- name: next_schedule
SELECT reactor.next_schedule_at() AS next_run_at, clock_timestamp() AS db_now

-- name: prune_jobs
-- finished jobs past job_queue_config.job_retention, with their events: one batch (migration 0013)
SELECT * FROM reactor.prune_jobs(%(limit)s, %(since)s)

-- name: render_cache_take
SELECT * FROM reactor.render_cache_take(%(job)s, %(attempt)s, %(reactor)s, %(key)s, %(request)s::jsonb,
                                        make_interval(secs => %(wait_s)s))
