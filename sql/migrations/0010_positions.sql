-- 0010_positions: queue positions at any depth, exact, stored in no row.
--
-- Apply with `reactor migrate --dsn DSN`, or by hand:
--     psql "$DSN" -v ON_ERROR_STOP=1 --single-transaction -f sql/migrations/0010_positions.sql
-- Roll back with `reactor migrate --dsn DSN --down --to 9` (sql/rollback/0010_positions.sql).
-- Never edit this file once released: add a new numbered migration instead.
--
-- Until now jobs.queue_position was 1 + a count of the queued jobs ahead, taken for each row read.
-- One job's position cost O(position); the whole queue in position order (the old system's
-- `SELECT ... FROM jobs WHERE status = 'queued' ORDER BY queue_position`, a PostgREST
-- `?order=queue_position`) cost O(n^2): at 100,000 queued it did not finish in 150 s.
--
-- Now a position is 1 + the jobs queued in higher priorities + the jobs of its own priority ahead of
-- it, and everything a statement needs for that is read once per statement, not once per row:
--
--   * each queued job has a key, reactor.queue_key(priority_rank, created_at, job_no): one uuid whose
--     byte order is the queue's order (priority, then created_at, then job_no), held by a partial
--     index of the queued jobs (jobs_queue_key_idx);
--   * how many jobs are queued at each priority comes from the newest reactor.totals row, plus what
--     this transaction itself changed and has not journalled yet (its rows in reactor.event_stage):
--     exactly what the statement sees, in O(1), and exact as long as the totals are (every path that
--     changes a job keeps them: tests/integration/test_totals_concurrency.py);
--   * the keys of the first and the last 64 queued jobs of each priority, with their positions: one
--     sorted array, read once per statement. A job among them (the head of the queue, "you are
--     3rd", and a job just inserted, at the tail) finds its position by a binary search
--     (width_bucket) in it;
--   * the keys of the queued jobs of one priority, in order, read only when a statement asks for a
--     job deeper than that, in two parts split about halfway (by created_at): once per statement and
--     part, and only the part the job falls in (about half of that priority's jobs); the job's place
--     among its own priority is again a binary search.
--
-- Each of these is an uncorrelated subquery of the view, so PostgreSQL computes it at most once per
-- statement and only when a row needs it (an InitPlan, evaluated on first use); the per-row work is
-- a key and one or two binary searches, inlined (reactor.queue_position_at). One job's position costs
-- under a millisecond near either end of its priority and about half its priority's depth in the
-- middle; the whole queue in position order costs O(n log n). Nothing is written when a job is
-- queued or leaves the queue, beyond the index entry of its key.
--
-- The functions that read the queue run as their owner (SECURITY DEFINER): under the Supabase
-- hardening a user reads only their own jobs, and a position counts everyone's. They are executable
-- by anyone who can read jobs: besides the counts per priority (which reactor.queue_position()
-- already gave), they reveal the created_at of queued jobs, nothing else about them.
--
-- reactor.queue_position(smallint, timestamptz, bigint) (the count) stays for callers outside; the
-- view no longer uses it.

-- The key packs 1 byte of priority_rank, the 8 bytes of created_at (its sign bit flipped so that
-- bytes sort like the time, infinities included) and the low 7 bytes of job_no, big-endian: uuids
-- compare as bytes, so keys compare like (priority_rank, created_at, job_no) for any job_no below
-- 2^56 (the identity starts at 1 and would need over 2,000 years at a million jobs a second).
ALTER TABLE reactor.jobs ADD CONSTRAINT "jobs.job_no must be between 1 and 2^56 - 1 (queue keys hold 7 bytes of it)"
    CHECK (job_no BETWEEN 1 AND 72057594037927935);

CREATE FUNCTION reactor.queue_key(p_rank smallint, p_created timestamptz, p_no bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT encode(set_byte(substr(int2send(p_rank), 2) || timestamptz_send(p_created) || substr(int8send(p_no), 2),
                           1, get_byte(timestamptz_send(p_created), 0) # 128), 'hex')::uuid
$$;
COMMENT ON FUNCTION reactor.queue_key(smallint, timestamptz, bigint) IS
    'A queued job''s place in the queue as one uuid: keys sort like (priority_rank, created_at, job_no).';

CREATE INDEX jobs_queue_key_idx ON reactor.jobs (reactor.queue_key(priority_rank, created_at, job_no))
    INCLUDE (priority_rank, created_at, job_no) WHERE status = 'queued';

-- How many jobs are queued at each priority (high, medium, low), as the calling statement sees them:
-- the newest totals row it can see, plus this transaction's changes that are staged but not yet
-- journalled (the journal adds them to the totals at commit). A transaction without an xid has
-- changed nothing, and does not read the staging table (unlogged: a hot standby cannot read it).
CREATE FUNCTION reactor.queue_counts() RETURNS bigint[]
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me xid8 := pg_current_xact_id_if_assigned();
    n  bigint[];
BEGIN
    -- plpgsql rather than sql: its plans are kept for the session, not made again by every statement
    SELECT ARRAY[t.queued_high, t.queued_medium, t.queued_low] INTO n
      FROM reactor.totals t ORDER BY t.id DESC LIMIT 1;
    IF me IS NOT NULL THEN
        SELECT ARRAY[n[1] + count(*) FILTER (WHERE e.status = 'queued' AND e.priority = 'high')
                          - count(*) FILTER (WHERE e.old_status = 'queued' AND coalesce(e.old_priority, e.priority) = 'high'),
                     n[2] + count(*) FILTER (WHERE e.status = 'queued' AND e.priority = 'medium')
                          - count(*) FILTER (WHERE e.old_status = 'queued' AND coalesce(e.old_priority, e.priority) = 'medium'),
                     n[3] + count(*) FILTER (WHERE e.status = 'queued' AND e.priority = 'low')
                          - count(*) FILTER (WHERE e.old_status = 'queued' AND coalesce(e.old_priority, e.priority) = 'low')]
          INTO n
          FROM reactor.event_stage e WHERE e.xid = me;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION reactor.queue_counts() IS
    'Jobs queued at priority high, medium, low as this statement sees them (newest totals + own staged changes).';

-- For each priority: how many jobs are queued in the priorities above it.
CREATE FUNCTION reactor.queue_above() RETURNS bigint[]
LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY[0, n[1], n[1] + n[2]] FROM reactor.queue_counts() n
$$;

-- Where the keys of one priority are split in two for reading (see queue_band_keys): about halfway
-- between its first and its last queued job by created_at (by job_no when they share it). Where it
-- falls only decides how much a lookup reads, never what it finds, so the first job is taken from
-- the claims' cursors (0008) where they have moved: under a pinned horizon the head of a priority
-- is where the index entries of claimed jobs pile up, and this is read up to three times a statement.
CREATE FUNCTION reactor.queue_split(p_rank smallint) RETURNS uuid
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lo       uuid := reactor.queue_key(p_rank, '-infinity', 0);
    hi       uuid := reactor.queue_key((p_rank + 1)::smallint, '-infinity', 0);
    first_at timestamptz;
    first_no bigint;
    last     record;
BEGIN
    SELECT j.created_at, j.job_no INTO last FROM reactor.jobs j
     WHERE j.status = 'queued'
       AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) >= lo
       AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) < hi
     ORDER BY reactor.queue_key(j.priority_rank, j.created_at, j.job_no) DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN hi;
    END IF;
    -- the lower of the two cursors of this priority (Manim and the others)
    SELECT c.at, c.no INTO first_at, first_no
      FROM (SELECT * FROM reactor.totals ORDER BY id DESC LIMIT 1) t,
           LATERAL (VALUES (t.cursor_at[1 + p_rank], t.cursor_no[1 + p_rank]),
                           (t.cursor_at[4 + p_rank], t.cursor_no[4 + p_rank])) c(at, no)
     ORDER BY c.at, c.no LIMIT 1;
    IF first_at IS NULL OR NOT isfinite(first_at) OR (first_at, first_no) > (last.created_at, last.job_no) THEN
        SELECT j.created_at, j.job_no INTO first_at, first_no FROM reactor.jobs j
         WHERE j.status = 'queued'
           AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) >= lo
           AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) < hi
         ORDER BY reactor.queue_key(j.priority_rank, j.created_at, j.job_no) LIMIT 1;
    END IF;
    IF first_at < last.created_at AND isfinite(first_at) AND isfinite(last.created_at) THEN
        RETURN reactor.queue_key(p_rank, first_at + (last.created_at - first_at) / 2, 0);
    END IF;
    RETURN reactor.queue_key(p_rank, last.created_at, first_no / 2 + last.job_no / 2);
END
$$;
COMMENT ON FUNCTION reactor.queue_split(smallint) IS
    'The key where queue_band_keys splits the keys of one priority in two (about halfway; only speed depends on it).';

-- The keys of one priority's queued jobs, in queue order, in two parts split at queue_split(): the
-- head part holds the keys before the split; the tail part holds the keys from the split on, after
-- as many copies of the priority's lowest possible key as there are jobs before the split (from the
-- counts, so they are not read): a binary search in either part then counts every job of the
-- priority ahead of a key in it. One job in the middle of a priority reads one part, about half.
CREATE FUNCTION reactor.queue_band_keys(p_rank smallint, p_tail boolean) RETURNS uuid[]
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lo    uuid := reactor.queue_key(p_rank, '-infinity', 0);
    hi    uuid := reactor.queue_key((p_rank + 1)::smallint, '-infinity', 0);
    split uuid := reactor.queue_split(p_rank);
    keys  uuid[];
BEGIN
    IF NOT p_tail THEN
        RETURN ARRAY(
            SELECT reactor.queue_key(j.priority_rank, j.created_at, j.job_no) FROM reactor.jobs j
             WHERE j.status = 'queued'
               AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) >= lo
               AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) < split
             ORDER BY reactor.queue_key(j.priority_rank, j.created_at, j.job_no));
    END IF;
    keys := ARRAY(
        SELECT reactor.queue_key(j.priority_rank, j.created_at, j.job_no) FROM reactor.jobs j
         WHERE j.status = 'queued'
           AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) >= split
           AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) < hi
         ORDER BY reactor.queue_key(j.priority_rank, j.created_at, j.job_no));
    RETURN array_fill(lo, ARRAY[greatest((reactor.queue_counts())[p_rank + 1] - cardinality(keys), 0)::integer]) || keys;
END
$$;
COMMENT ON FUNCTION reactor.queue_band_keys(smallint, boolean) IS
    'Keys of one priority''s queued jobs before queue_split() (p_tail false), or from it on after a '
    'placeholder for each job before it (p_tail true), in queue order.';

-- The ends of the queue: for each priority, the keys of its first and its last p_each queued jobs
-- (all of them when it has at most 2 * p_each), in queue order, as one sorted array. How many come
-- from each end depends on the counts alone, so that reactor.queue_ends_positions() can number them
-- without reading them. A priority with at most p_each jobs is read from its tail only: its live
-- jobs come after the entries that jobs which left the queue leave at its head.
CREATE FUNCTION reactor.queue_ends_keys(p_each integer) RETURNS uuid[]
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n    bigint[] := reactor.queue_counts();
    keys uuid[] := '{}';
    r    integer;
    lo   uuid;
    hi   uuid;
BEGIN
    FOR r IN 0..2 LOOP
        CONTINUE WHEN n[r + 1] <= 0;
        lo := reactor.queue_key(r::smallint, '-infinity', 0);
        hi := reactor.queue_key((r + 1)::smallint, '-infinity', 0);
        IF n[r + 1] > p_each THEN
            keys := keys || ARRAY(
                SELECT reactor.queue_key(j.priority_rank, j.created_at, j.job_no) FROM reactor.jobs j
                 WHERE j.status = 'queued'
                   AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) >= lo
                   AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) < hi
                 ORDER BY reactor.queue_key(j.priority_rank, j.created_at, j.job_no)
                 LIMIT least(n[r + 1] - p_each, p_each));
        END IF;
        keys := keys || ARRAY(
            SELECT t.k FROM (
                SELECT reactor.queue_key(j.priority_rank, j.created_at, j.job_no) AS k FROM reactor.jobs j
                 WHERE j.status = 'queued'
                   AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) >= lo
                   AND reactor.queue_key(j.priority_rank, j.created_at, j.job_no) < hi
                 ORDER BY reactor.queue_key(j.priority_rank, j.created_at, j.job_no) DESC
                 LIMIT least(n[r + 1], p_each)) t
             ORDER BY t.k);
    END LOOP;
    RETURN keys;
END
$$;
COMMENT ON FUNCTION reactor.queue_ends_keys(integer) IS
    'Keys of the first and last p_each queued jobs of each priority, in queue order (see queue_ends_positions).';

-- The positions that go with reactor.queue_ends_keys(p_each), shifted by one: element i + 1 is the
-- position of key i, and element 1 is 0 (nothing ahead). NULL after the last key read from the head
-- of a priority that has jobs between its two ends: those are not in the keys.
CREATE FUNCTION reactor.queue_ends_positions(p_each integer) RETURNS bigint[]
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n     bigint[] := reactor.queue_counts();
    pos   bigint[] := '{0}';
    above bigint := 0;
    m     bigint;
    head  bigint;
    tail  bigint;
    r     integer;
BEGIN
    FOR r IN 0..2 LOOP
        m := greatest(n[r + 1], 0);
        head := least(greatest(m - p_each, 0), p_each);
        tail := least(m, p_each);
        pos := pos || ARRAY(SELECT above + i FROM generate_series(1, head) i);
        IF head + tail < m THEN
            pos[cardinality(pos)] := NULL;
        END IF;
        pos := pos || ARRAY(SELECT above + m - tail + i FROM generate_series(1, tail) i);
        above := above + m;
    END LOOP;
    RETURN pos;
END
$$;
COMMENT ON FUNCTION reactor.queue_ends_positions(integer) IS
    'Positions of the keys of queue_ends_keys(p_each), shifted by one (element 1 is 0); NULL where jobs lie between.';

-- A queued job's position from what the statement read once: its key's place among the ends, or
-- else among the keys of its priority (the part before or after the split) after the jobs queued
-- above it. Inlined into the view: each array is used once, so the ones a row does not need are
-- never read (for a job at either end, only the ends). "Ahead of the job" is "at or before
-- job_no - 1", which holds for a job the statement cannot see itself (an INSERT's or UPDATE's
-- RETURNING) as for one it can.
CREATE FUNCTION reactor.queue_position_at(p_rank smallint, p_created timestamptz, p_no bigint,
                                          p_ends uuid[], p_ends_positions bigint[], p_above bigint[],
                                          p_splits uuid[], p_high_head uuid[], p_high_tail uuid[],
                                          p_medium_head uuid[], p_medium_tail uuid[],
                                          p_low_head uuid[], p_low_tail uuid[])
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 1 + coalesce(
        p_ends_positions[1 + width_bucket(reactor.queue_key(p_rank, p_created, p_no - 1), p_ends)],
        p_above[p_rank + 1] + width_bucket(
            reactor.queue_key(p_rank, p_created, p_no - 1),
            CASE WHEN reactor.queue_key(p_rank, p_created, p_no - 1) < p_splits[p_rank + 1]
                 THEN CASE p_rank WHEN 0 THEN p_high_head WHEN 1 THEN p_medium_head ELSE p_low_head END
                 ELSE CASE p_rank WHEN 0 THEN p_high_tail WHEN 1 THEN p_medium_tail ELSE p_low_tail END
            END))
$$;
COMMENT ON FUNCTION reactor.queue_position_at(smallint, timestamptz, bigint, uuid[], bigint[], bigint[], uuid[],
                                              uuid[], uuid[], uuid[], uuid[], uuid[], uuid[]) IS
    'A queued job''s position from the arrays public.jobs reads once per statement (see migration 0010).';

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

INSERT INTO reactor.schema_migrations (version, name) VALUES (10, 'positions');
