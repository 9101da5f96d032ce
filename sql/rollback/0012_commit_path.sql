-- Rollback of 0012_commit_path: reactor.sequence_commit() of 0008 comes back.
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/rollback/0012_commit_path.sql

CREATE OR REPLACE FUNCTION reactor.sequence_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    me   xid8 := NEW.xid;
    d    record;
    q    record;
    low  record;
    last bigint;
    msg  text;
BEGIN
    DELETE FROM reactor.pending_commits WHERE xid = me;
    SELECT count(*) AS n,
           count(*) FILTER (WHERE status = 'queued')     - count(*) FILTER (WHERE old_status = 'queued')     AS queued,
           count(*) FILTER (WHERE status = 'processing') - count(*) FILTER (WHERE old_status = 'processing') AS processing,
           count(*) FILTER (WHERE status = 'processing' AND renderer = 'manim')
               - count(*) FILTER (WHERE old_status = 'processing' AND renderer = 'manim')                    AS processing_manim,
           count(*) FILTER (WHERE status = 'completed')  - count(*) FILTER (WHERE old_status = 'completed')  AS completed,
           count(*) FILTER (WHERE status = 'failed')     - count(*) FILTER (WHERE old_status = 'failed')     AS failed,
           count(*) FILTER (WHERE status = 'cancelled')  - count(*) FILTER (WHERE old_status = 'cancelled')  AS cancelled,
           count(*) FILTER (WHERE status = 'queued' AND priority = 'high')
               - count(*) FILTER (WHERE old_status = 'queued' AND coalesce(old_priority, priority) = 'high')   AS q_high,
           count(*) FILTER (WHERE status = 'queued' AND priority = 'medium')
               - count(*) FILTER (WHERE old_status = 'queued' AND coalesce(old_priority, priority) = 'medium') AS q_medium,
           count(*) FILTER (WHERE status = 'queued' AND priority = 'low')
               - count(*) FILTER (WHERE old_status = 'queued' AND coalesce(old_priority, priority) = 'low')    AS q_low,
           count(*) FILTER (WHERE status = 'queued' AND old_status IS DISTINCT FROM 'queued')  AS became_queued,
           count(*) FILTER (WHERE old_status = 'processing' AND status IS DISTINCT FROM 'processing') AS freed,
           count(*) FILTER (WHERE kind = 'cancelled') AS cancelled_now
      INTO d
      FROM reactor.event_stage WHERE xid = me;
    IF d.n = 0 THEN
        RETURN NULL;
    END IF;
    -- jobs that became queued (inserted, retried, put back, moved to another priority): the claims'
    -- cursors must not pass them
    SELECT array_agg(j.renderer ORDER BY s.ord) AS renderer, array_agg(j.priority_rank ORDER BY s.ord) AS rank,
           array_agg(j.created_at ORDER BY s.ord) AS at, array_agg(j.job_no ORDER BY s.ord) AS no
      INTO q
      FROM reactor.event_stage s JOIN reactor.jobs j ON j.id = s.job_id
     WHERE s.xid = me AND s.status = 'queued' AND j.status = 'queued';
    SELECT k.at, k.no INTO low FROM reactor.cursor_keys(q.renderer, q.rank, q.at, q.no) k;
    last := reactor.append_totals(d.n, d.queued, d.processing, d.processing_manim, d.completed, d.failed,
                                  d.cancelled, d.q_high, d.q_medium, d.q_low, low.at, low.no, false);
    WITH moved AS (
        DELETE FROM reactor.event_stage WHERE xid = me
        RETURNING ord, job_id, kind, status, old_status, priority, job_type, renderer, user_id,
                  retry_count, error_category, actor)
    INSERT INTO reactor.events (seq, job_id, kind, status, old_status, priority, job_type, renderer,
                                user_id, retry_count, error_category, actor)
    SELECT last - d.n + row_number() OVER (ORDER BY ord), job_id, kind, status, old_status, priority,
           job_type, renderer, user_id, retry_count, error_category, actor
    FROM moved;
    IF d.n = 1 THEN
        SELECT json_build_object('seq', e.seq, 'n', 1, 'kind', e.kind, 'id', e.job_id,
                                 'status', e.status, 'old_status', e.old_status, 'priority', e.priority,
                                 'job_type', e.job_type, 'renderer', e.renderer,
                                 'user_id', e.user_id, 'actor', e.actor)::text
          INTO msg FROM reactor.events e WHERE e.seq = last;
    ELSE
        -- q: jobs that became queued, f: jobs that left processing, c: cancellations
        msg := json_build_object('seq', last, 'n', d.n, 'q', d.became_queued, 'f', d.freed,
                                 'c', d.cancelled_now, 'actor', reactor.current_actor())::text;
    END IF;
    PERFORM pg_notify('reactor_events', msg);
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reactor.schema_migrations WHERE version = 1001) THEN
        ALTER FUNCTION reactor.sequence_commit() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

DELETE FROM reactor.schema_migrations WHERE version = 12;
