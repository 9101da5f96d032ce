"""While something pins the MVCC horizon (a pg_dump, a session idle in transaction), no index scan
may mark an entry dead, so an index keeps one entry for every row version since. What the reactor
runs per job, and per sweep, must not walk those (migration 0009, bench/README "Under MVCC
pressure"). Work is counted in buffers read (EXPLAIN (ANALYZE, BUFFERS)), not in time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from reactor.db.store import Database

Conn = psycopg.Connection[Any]

pytestmark = pytest.mark.anyio


@pytest.fixture
def conn(dsn: str, db: Conn) -> Conn:
    """A database with 20,000 finished jobs: big enough that the planner reads a job by its key
    rather than scanning the table (as it would in production)."""
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 100000, max_manim_renders = 100000")
    db.execute("INSERT INTO jobs (job_type, status, payload, created_at) "
               "SELECT 'topic_short', 'completed', jsonb_build_object('topic', 'old ' || g), "
               "now() - interval '30 days' FROM generate_series(1, 20000) g")
    db.execute("VACUUM ANALYZE reactor.jobs")
    return db


@pytest.fixture
def pinned(dsn: str) -> Iterator[Conn]:
    """A session idle in a REPEATABLE READ transaction: vacuum and index scans keep every version."""
    with psycopg.connect(dsn) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM reactor.jobs")
        yield holder
        holder.rollback()


def outcome(job: tuple[str, int]) -> str:
    return json.dumps([{"id": job[0], "attempt": job[1], "status": "completed", "result": {"video_url": "u"},
                        "retry_count": 0, "delay_s": 0, "error_category": None, "error_message": None,
                        "error_details": None}])


def insert_and_claim(conn: Conn, lease_s: float = 1.0) -> tuple[str, int]:
    conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"t\"}')")
    row = conn.execute("SELECT id::text, attempt FROM reactor.claim_jobs('r', 1, make_interval(secs => %s))",
                       (lease_s,)).fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def run_through(conn: Conn, n: int) -> None:
    """``n`` jobs inserted, claimed and completed, one at a time, as the reactor does; then the
    statistics autovacuum's ANALYZE would gather (a handful of jobs queued or processing)."""
    for _ in range(n):
        job = insert_and_claim(conn)
        conn.execute("SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'r', 0, interval '1 s')", (outcome(job),))
    conn.execute("ANALYZE reactor.jobs")


def buffers(conn: Conn, statement: str, params: tuple[Any, ...] = ()) -> int:
    """Shared buffers the statement touched, nested statements included."""
    row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


def test_an_outcome_reads_as_much_after_thousands_of_jobs_as_after_a_hundred(conn: Conn, pinned: Conn) -> None:
    run_through(conn, 200)
    early = buffers(conn, "SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'r', 0, interval '1 s')",
                    (outcome(insert_and_claim(conn)),))
    run_through(conn, 2500)
    late = buffers(conn, "SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'r', 0, interval '1 s')",
                   (outcome(insert_and_claim(conn)),))
    # before 0009 the outcome's UPDATE hash-joined the whole processing index: +1 buffer per ~10
    # jobs that had passed through processing (here about +250)
    assert late <= early + 40, (early, late)


def test_a_sweep_from_its_floor_skips_the_leases_an_earlier_sweep_saw(conn: Conn, pinned: Conn) -> None:
    run_through(conn, 2000)  # 2,000 leases of a second, each ended by an outcome, none removable
    row = conn.execute("SELECT clock_timestamp() + interval '2 s'").fetchone()  # above every one of them
    assert row is not None
    floor = row[0]
    insert_and_claim(conn, lease_s=600)
    full = buffers(conn, "SELECT * FROM reactor.sweep()")
    floored = buffers(conn, "SELECT * FROM reactor.sweep(p_since => %s)", (floor,))
    wake_full = buffers(conn, "SELECT * FROM reactor.next_wakeups()")
    wake_floored = buffers(conn, "SELECT * FROM reactor.next_wakeups(%s)", (floor,))
    assert floored < 40 < full, (floored, full)
    assert wake_floored < 40 < wake_full, (wake_floored, wake_full)
    row = conn.execute("SELECT next_lease_expiry > now() + interval '500 s' FROM reactor.next_wakeups(%s)",
                       (floor,)).fetchone()
    assert row == (True,)


def test_the_oldest_queued_job_is_found_without_walking_what_was_claimed(conn: Conn, pinned: Conn) -> None:
    # an hour-old job that is not due for a day: claims pass it by, it stays the oldest queued
    conn.execute("INSERT INTO jobs (job_type, payload, created_at, run_after) "
                 "VALUES ('topic_short', '{\"topic\": \"t\"}', now() - interval '1 h', now() + interval '1 day')")
    run_through(conn, 2000)
    before = buffers(conn, "SELECT * FROM get_queue_stats()")
    row = conn.execute("SELECT oldest_queued_at < now() - interval '59 min' FROM get_queue_stats()").fetchone()
    assert row == (True,)
    conn.execute("UPDATE jobs SET status = 'cancelled' WHERE status = 'queued'")
    run_through(conn, 2000)
    conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"t\"}')")
    after = buffers(conn, "SELECT * FROM get_queue_stats()")
    # the stats' other figures read the last hour's jobs (about 4,000 here) from their time
    # indexes; before 0009 the oldest queued job alone walked the entries of every job claimed
    assert after < before + 150, (before, after)
    row = conn.execute("SELECT oldest_queued_at > now() - interval '1 min' FROM get_queue_stats()").fetchone()
    assert row == (True,)


def test_prune_goes_on_from_where_it_stopped(conn: Conn, pinned: Conn) -> None:
    run_through(conn, 500)
    row = conn.execute("SELECT events_pruned, totals_from FROM reactor.prune()").fetchone()
    assert row is not None
    newest = conn.execute("SELECT max(id) FROM reactor.totals").fetchone()
    assert newest is not None and row[1] == newest[0]
    assert conn.execute("SELECT count(*) FROM reactor.totals").fetchone() == (1,)
    run_through(conn, 1500)
    full = buffers(conn, "SELECT * FROM reactor.prune()")
    run_through(conn, 10)
    row = conn.execute("SELECT max(id) FROM reactor.totals").fetchone()
    assert row is not None
    conn.execute("SELECT * FROM reactor.prune()")  # everything up to now
    run_through(conn, 10)
    after = buffers(conn, "SELECT * FROM reactor.prune(now(), %s)", (row[0],))
    assert after < 100 < full, (after, full)
    # the newest row always stays, and is the one readers take
    assert conn.execute("SELECT count(*) FROM reactor.totals").fetchone() == (1,)
    assert conn.execute("SELECT last_seq FROM reactor.counters").fetchone() == conn.execute(
        "SELECT max(seq) FROM reactor.events").fetchone()


async def test_a_straggler_below_the_floor_is_taken_back_by_the_next_full_sweep(conn: Conn, dsn: str) -> None:
    database = Database(dsn, "r")
    await database.open()
    try:
        await database.sweep(grace_s=30, orphan_s=30)  # the first sweep looks at everything
        floor = database._sweep_floor
        assert floor is not None
        # expired leases: one below the floor (a claim that committed long after it began), one above
        below = insert_and_claim(conn, lease_s=600)[0]
        above = insert_and_claim(conn, lease_s=600)[0]
        conn.execute("UPDATE reactor.jobs SET lease_expires_at = %s WHERE id = %s",
                     (floor - timedelta(seconds=30), below))
        conn.execute("UPDATE reactor.jobs SET lease_expires_at = %s WHERE id = %s",
                     (floor + timedelta(seconds=1), above))
        unleased = insert_and_claim(conn, lease_s=600)[0]  # processing with no lease: set by hand
        conn.execute("UPDATE reactor.jobs SET lease_expires_at = NULL, started_at = now() - interval '1 h' "
                     "WHERE id = %s", (unleased,))
        swept, _ = await database.sweep(grace_s=30, orphan_s=30)
        assert {str(r["id"]) for r in swept} == {above, unleased}
        database._full_sweep_at = 0.0  # the full sweep's time has come
        swept, _ = await database.sweep(grace_s=30, orphan_s=30)
        assert {str(r["id"]) for r in swept} == {below}
        row = conn.execute("SELECT status, error_category FROM reactor.jobs WHERE id = %s", (below,)).fetchone()
        assert row == ("queued", "TIMEOUT")
    finally:
        await database.close()


def commit_reads(conn: Conn) -> dict[str, int]:
    """Blocks of reactor relations that one INSERT's commit work reads: the deferred triggers run
    at SET CONSTRAINTS ALL IMMEDIATE, and the transaction's own block counts are read around it."""
    counts = ("SELECT c.relname, pg_stat_get_xact_blocks_fetched(c.oid) FROM pg_class c "
              "WHERE c.relnamespace = 'reactor'::regnamespace AND c.relkind IN ('r', 'i')")
    with conn.transaction():
        conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"t\"}')")
        before = {str(r[0]): int(r[1]) for r in conn.execute(counts).fetchall()}
        conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        after = {str(r[0]): int(r[1]) for r in conn.execute(counts).fetchall()}
    return {name: after[name] - before.get(name, 0) for name in after}


def test_a_commit_reads_the_jobs_it_queued_by_key_whatever_the_statistics_say(conn: Conn, pinned: Conn) -> None:
    # after each step ANALYZE sees a handful of queued jobs; before 0012 the planner then read the
    # jobs that became queued from the queued-jobs index, every dead entry of it (here 14 -> 81
    # blocks of jobs after 200 -> 1,200 jobs; 2,196 buffers a commit after 34,000 in the bench)
    seen = []
    for n in (200, 1000, 1500):
        run_through(conn, n)
        reads = commit_reads(conn)
        seen.append(reads)
        # planning reads each index's metapage; the job itself is one heap block
        assert reads["jobs_queue_key_idx"] <= 2 and reads["jobs"] <= 4, (n, reads)
