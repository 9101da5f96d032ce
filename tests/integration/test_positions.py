"""Queue positions (migrations 0010, 0013) against a recount, at every depth: each due queued job's
``queue_position`` through ``jobs`` is 1 + the due queued jobs ahead of it (priority, then created_at,
then job_no; both renderers counted, jobs still waiting for their run_after not), read one job at a
time, all together, in position order, in an INSERT's or UPDATE's RETURNING, inside a transaction
that changed the queue, and in a REPEATABLE READ snapshot. The view keeps the first and last 64 jobs
of each priority apart from the rest, so the queues here are deeper than that where it matters."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reactor.db.migrations import migrate_down, migrate_up

Conn = psycopg.Connection[Any]

#: jobs at each end of a priority that the view reads apart from the rest (migration 0010)
ENDS = 64
PRIORITIES = ("high", "medium", "low")
#: job types by renderer: doubt renders with manim, topic_short with revideo
JOB_TYPES = ("doubt", "topic_short")

ORACLE = """
SELECT id, row_number() OVER (ORDER BY priority_rank, created_at, job_no) AS position
  FROM reactor.jobs WHERE status = 'queued' AND run_after <= now()
"""


def oracle(conn: Conn) -> dict[uuid.UUID, int]:
    """Each due queued job's position by a recount: its place in the queue's order, among the due."""
    return {r[0]: int(r[1]) for r in conn.execute(ORACLE)}


def insert(conn: Conn, n: int = 1, *, priority: str = "medium", job_type: str = "topic_short",
           created_ago_s: float = 0.0, delay_s: float = 0.0) -> list[uuid.UUID]:
    """n jobs in one statement (so they share created_at and are ordered by job_no)."""
    rows = conn.execute(
        "INSERT INTO jobs (job_type, priority, payload, created_at, run_after) "
        "SELECT %s, %s, '{\"question\": \"q\", \"topic\": \"t\"}', now() - make_interval(secs => %s), "
        "now() + make_interval(secs => %s) FROM generate_series(1, %s) RETURNING id",
        (job_type, priority, created_ago_s, delay_s, n)).fetchall()
    return [r[0] for r in rows]


def check(conn: Conn, sample: int | None = 40, seed: int = 0) -> dict[uuid.UUID, int]:
    """Every way of reading positions agrees with the recount; returns the recount. A job waiting
    for its run_after has no position (NULL until due, issue 17) and holds no place ahead of the due
    jobs behind it (migration 0013)."""
    want = oracle(conn)
    # all rows at once: due queued ones numbered, the others NULL (now() is the statement's)
    rows = conn.execute("SELECT id, queue_position, status = 'queued' AND run_after > now() FROM jobs").fetchall()
    got = {r[0]: r[1] for r in rows}
    waiting = {r[0] for r in rows if r[2]}
    due = {k: v for k, v in want.items() if k not in waiting}
    assert {k: v for k, v in got.items() if v is not None} == due
    assert conn.execute("SELECT count(*) FROM reactor.jobs").fetchone() == (len(got),)
    # the whole queue in position order
    listed = conn.execute("SELECT id, queue_position FROM jobs WHERE status = 'queued' "
                          "AND queue_position IS NOT NULL ORDER BY queue_position").fetchall()
    assert [p for _, p in listed] == sorted(due.values())
    assert [i for i, _ in listed] == sorted(due, key=due.__getitem__)
    # one job at a time: the head and the tail of every priority, and a sample of the rest
    ids = sorted(want, key=want.__getitem__)
    by_priority: dict[str, list[uuid.UUID]] = {}
    for job_id, priority in conn.execute(
            "SELECT id, priority FROM reactor.jobs WHERE status = 'queued' AND run_after <= now()"):
        by_priority.setdefault(priority, []).append(job_id)
    picks = set()
    for members in by_priority.values():
        members.sort(key=want.__getitem__)
        picks.update(members[:2] + members[ENDS - 1:ENDS + 1] + members[-ENDS - 1:-ENDS + 1] + members[-2:])
    rng = random.Random(seed)
    picks.update(ids if sample is None else rng.sample(ids, min(sample, len(ids))))
    picks.update(sorted(waiting)[:5])  # NULL, one at a time too
    for job_id in picks:
        row = conn.execute("SELECT queue_position FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert row == (due.get(job_id),), job_id
    return want


def claim(conn: Conn, n: int) -> list[tuple[uuid.UUID, int]]:
    rows = conn.execute("SELECT id, attempt FROM reactor.claim_jobs('r', %s, interval '60 s')", (n,)).fetchall()
    return [(r[0], r[1]) for r in rows]


def finish(conn: Conn, job: tuple[uuid.UUID, int], status: str, delay_s: float = 0.0) -> None:
    batch = [{"id": str(job[0]), "attempt": job[1], "status": status, "result": None, "retry_count": 1,
              "delay_s": delay_s, "error_category": "API_ERROR", "error_message": "x", "error_details": None}]
    conn.execute("SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'r', 0, interval '60 s')", (json.dumps(batch),))


def nth_queued(conn: Conn, n: int, priority: str | None = None) -> uuid.UUID:
    """The queued job at place n (0-based, modulo the count) of the queue or of one priority."""
    rows = conn.execute(
        "SELECT id FROM reactor.jobs WHERE status = 'queued' AND (%s::text IS NULL OR priority = %s) "
        "ORDER BY priority_rank, created_at, job_no", (priority, priority)).fetchall()
    assert rows
    job_id: uuid.UUID = rows[n % len(rows)][0]
    return job_id


@pytest.fixture
def conn(db: Conn) -> Conn:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 100000, max_manim_renders = 100000")
    return db


@pytest.mark.parametrize("depth", [0, 1, ENDS - 1, ENDS, ENDS + 1, 2 * ENDS - 1, 2 * ENDS, 2 * ENDS + 1, 300])
def test_positions_match_a_recount_at_every_depth_of_a_priority(conn: Conn, depth: int) -> None:
    # the priority under test between two others, and the edges of the ends the view keeps apart
    insert(conn, 3, priority="high", job_type="doubt")
    insert(conn, depth // 2, priority="medium", job_type="doubt")
    insert(conn, depth - depth // 2, priority="medium", job_type="topic_short", created_ago_s=1)
    insert(conn, 2 * ENDS + 5, priority="low")
    check(conn, sample=None)


def test_positions_stay_exact_as_the_queue_changes(conn: Conn) -> None:
    for priority, n in (("high", 150), ("medium", 400), ("low", 90)):
        for job_type in JOB_TYPES:
            insert(conn, n // 2, priority=priority, job_type=job_type)
    # older and newer than the rest, and jobs waiting for a retry (still queued, so counted)
    insert(conn, 5, priority="medium", created_ago_s=3600)
    insert(conn, 5, priority="medium", created_ago_s=-3600)
    insert(conn, 70, priority="low", job_type="doubt", delay_s=3600)
    check(conn)

    held = claim(conn, 30)
    check(conn, seed=1)
    finish(conn, held[0], "queued", delay_s=600)  # a retry goes back to its place at the head
    finish(conn, held[1], "completed")
    finish(conn, held[2], "failed")
    check(conn, seed=2)
    for n in (7, 100, 201, 399):  # cancels at the head, in the middle and near the tail
        conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (nth_queued(conn, n, "medium"),))
    check(conn, seed=3)
    conn.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (nth_queued(conn, 300, "low"),))
    conn.execute("UPDATE jobs SET priority = 'low' WHERE id = %s", (nth_queued(conn, 2, "high"),))
    conn.execute("UPDATE jobs SET priority = 'medium' WHERE id = %s", (nth_queued(conn, 80, "high"),))
    check(conn, seed=4)
    conn.execute("DELETE FROM jobs WHERE id = %s", (nth_queued(conn, 150),))
    conn.execute("UPDATE jobs SET created_at = now() - interval '2 hours' WHERE id = %s",
                 (nth_queued(conn, 250, "medium"),))
    conn.execute("UPDATE jobs SET renderer = 'manim' WHERE id = %s", (nth_queued(conn, 120, "medium"),))
    check(conn, seed=5)
    conn.execute("UPDATE jobs SET status = 'queued' WHERE status IN ('failed', 'completed')")
    held = claim(conn, 500)
    check(conn, seed=6)
    for job in held[:300]:
        finish(conn, job, "completed")
    conn.execute("UPDATE jobs SET status = 'cancelled' WHERE status = 'queued' AND priority = 'high'")
    check(conn, sample=None)


def test_insert_returning_gives_the_position_the_job_then_has(conn: Conn) -> None:
    for priority in PRIORITIES:
        insert(conn, 200, priority=priority)
    for created_ago_s in (0.0, -60.0, 7200.0, 30.0):  # the tail, behind it, the head, the middle
        for priority in PRIORITIES:
            for job_type in JOB_TYPES:
                row = conn.execute(
                    "INSERT INTO jobs (job_type, priority, payload, created_at) "
                    "VALUES (%s, %s, '{\"question\": \"q\", \"topic\": \"t\"}', now() - make_interval(secs => %s)) "
                    "RETURNING id, status, queue_position",
                    (job_type, priority, created_ago_s)).fetchone()
                assert row is not None
                assert row[1] == "queued" and row[2] == oracle(conn)[row[0]], (created_ago_s, priority, job_type)
    # in a transaction that changed the queue before: its own changes are counted
    with conn.transaction():
        insert(conn, 150, priority="high", created_ago_s=10)
        conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (nth_queued(conn, 3, "medium"),))
        conn.execute("UPDATE jobs SET priority = 'low' WHERE id = %s", (nth_queued(conn, 100, "medium"),))
        for created_ago_s in (0.0, 20.0):
            row = conn.execute(
                "INSERT INTO jobs (job_type, priority, payload, created_at) "
                "VALUES ('doubt', 'medium', '{\"question\": \"q\"}', now() - make_interval(secs => %s)) "
                "RETURNING id, queue_position", (created_ago_s,)).fetchone()
            assert row is not None and row[1] == oracle(conn)[row[0]]
        check(conn)
    check(conn)


def test_a_multi_row_insert_numbers_each_row_against_the_queue_before_it(conn: Conn) -> None:
    insert(conn, 300)
    rows = conn.execute(
        "INSERT INTO jobs (job_type, priority, payload) SELECT 'doubt', 'medium', '{\"question\": \"q\"}' "
        "FROM generate_series(1, 3) RETURNING id, queue_position").fetchall()
    assert [p for _, p in rows] == [301, 301, 301]  # as the README says: read them again after a batch
    want = check(conn)
    assert [want[i] for i, _ in rows] == [301, 302, 303]


def test_update_returning_gives_the_position_the_job_then_has(conn: Conn) -> None:
    insert(conn, 300)
    insert(conn, 100, priority="high")
    gone = nth_queued(conn, 200, "medium")
    conn.execute("UPDATE jobs SET status = 'failed' WHERE id = %s", (gone,))
    row = conn.execute("UPDATE jobs SET status = 'queued' WHERE id = %s RETURNING queue_position", (gone,)).fetchone()
    assert row == (oracle(conn)[gone],) and row[0] == 100 + 200 + 1
    # an update that leaves the job where it is
    middle = nth_queued(conn, 150, "medium")
    row = conn.execute("UPDATE jobs SET payload = '{\"topic\": \"u\"}' WHERE id = %s RETURNING queue_position",
                       (middle,)).fetchone()
    assert row == (oracle(conn)[middle],)
    low = insert(conn, 1, priority="low")[0]
    row = conn.execute("UPDATE jobs SET priority = 'high' WHERE id = %s RETURNING queue_position", (low,)).fetchone()
    assert row == (oracle(conn)[low],) == (101,)


def test_positions_inside_a_transaction_count_its_own_changes(conn: Conn, dsn: str) -> None:
    insert(conn, 200, priority="medium")
    insert(conn, 200, priority="low")
    with psycopg.connect(dsn) as tx:  # not autocommit: every statement below is in one transaction
        insert(tx, 180, priority="high", job_type="doubt")
        check(tx)
        tx.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (nth_queued(tx, 10, "medium"),))
        tx.execute("UPDATE jobs SET status = 'cancelled' WHERE id IN (SELECT id FROM reactor.jobs "
                   "WHERE status = 'queued' AND priority = 'low' ORDER BY job_no LIMIT 90)")
        check(tx)
        with tx.transaction():  # a savepoint rolled back takes its changes with it
            insert(tx, 50, priority="medium", created_ago_s=100)
            tx.execute("SAVEPOINT inner_one")
            insert(tx, 70, priority="high")
            check(tx)
            tx.execute("ROLLBACK TO SAVEPOINT inner_one")
            check(tx)
        # meanwhile another session sees none of it
        check(conn)
        tx.commit()
    check(conn)


def test_repeatable_read_sees_the_positions_of_its_snapshot(conn: Conn, dsn: str) -> None:
    insert(conn, 300)
    insert(conn, 150, priority="high")
    with psycopg.connect(dsn) as rr:
        rr.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        before = check(rr)
        for job in claim(conn, 100):
            finish(conn, job, "completed")
        insert(conn, 100, priority="high", created_ago_s=10)
        assert check(rr) == before
        rr.execute("COMMIT")
    check(conn)


def _plan(conn: Conn, query: str, params: tuple[Any, ...]) -> dict[str, Any]:
    row = conn.execute("EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " + query, params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def _initplans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for sub in plan.get("Plans", []):
        if sub.get("Parent Relationship") == "InitPlan":
            yield sub
        yield from _initplans(sub)


def test_one_job_reads_only_what_its_position_needs(conn: Conn) -> None:
    """A job in the middle of its priority reads one part of that priority's keys (before or after the
    split); the ends suffice near either end; the whole queue reads every part once; the per-row part
    is inlined (no function call per row)."""
    for priority in PRIORITIES:
        insert(conn, 3 * ENDS, priority=priority)
    head, middle = nth_queued(conn, 2, "medium"), nth_queued(conn, ENDS + 10, "medium")
    tail = insert(conn, 1, priority="medium")[0]

    def bands_read(job_id: uuid.UUID) -> list[str]:
        plan = _plan(conn, "SELECT queue_position FROM jobs WHERE id = %s", (job_id,))
        assert "queue_position_at" not in json.dumps(plan)
        return sorted(p["Subplan Name"] for p in _initplans(plan)
                      if p.get("Actual Loops", 0) > 0 and "queue_band_keys" in json.dumps(p))

    assert bands_read(head) == [] and bands_read(tail) == []
    assert len(bands_read(middle)) == 1
    listed = _plan(conn, "SELECT id, queue_position FROM jobs WHERE status = 'queued' ORDER BY queue_position", ())
    assert "queue_position_at" not in json.dumps(listed)
    parts = [p["Actual Loops"] for p in _initplans(listed) if "queue_band_keys" in json.dumps(p) and p["Actual Loops"]]
    assert 3 <= len(parts) <= 6 and set(parts) == {1}  # each part read once, if a job of it is in the middle


@pytest.mark.parametrize("split", [
    "reactor.queue_key(p_rank, '-infinity', 0)",                     # everything after the split
    "reactor.queue_key((p_rank + 1)::smallint, '-infinity', 0)",     # everything before it
    "reactor.queue_key(p_rank, now() - interval '150 s', 0)",        # somewhere in between
])
def test_where_a_priority_is_split_changes_nothing_but_cost(conn: Conn, split: str) -> None:
    for ago in (300, 200, 100, 0):
        for priority in PRIORITIES:
            insert(conn, 60, priority=priority, created_ago_s=ago)
    conn.execute("CREATE OR REPLACE FUNCTION reactor.queue_split(p_rank smallint) RETURNS uuid "
                 f"LANGUAGE sql STABLE AS $$ SELECT {split} $$")
    check(conn, sample=None)


def test_job_no_beyond_the_key_is_refused(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="job_no must be between 1 and 2"):
        conn.execute("INSERT INTO reactor.jobs (job_no, job_type, payload) OVERRIDING SYSTEM VALUE "
                     "VALUES (72057594037927936, 'doubt', '{\"question\": \"q\"}')")


def test_keys_sort_like_the_queue(conn: Conn) -> None:
    """reactor.queue_key orders like (priority_rank, created_at, job_no), infinities and old dates too."""
    rows = conn.execute(
        "WITH k AS (SELECT r::smallint AS r, t, n FROM generate_series(0, 2) r, "
        "unnest(ARRAY['-infinity', '1900-01-01', '1999-12-31 23:59:59.999999', '2000-01-01', "
        "'2000-01-01 00:00:00.000001', now(), '294276-01-01', 'infinity']::timestamptz[]) t, "
        "unnest(ARRAY[0, 1, 2, 255, 256, 65535, 4294967296, 72057594037927935]::bigint[]) n) "
        "SELECT count(*), count(*) FILTER (WHERE a <> b) FROM ("
        "SELECT row_number() OVER (ORDER BY r, t, n) a, "
        "row_number() OVER (ORDER BY reactor.queue_key(r, t, n)) b FROM k) s").fetchone()
    assert rows == (3 * 8 * 8, 0)


def test_rolling_back_0010_counts_again(dsn: str, conn: Conn) -> None:
    insert(conn, 200)
    insert(conn, 20, priority="high")
    migrate_down(dsn, to_version=9)
    check(conn, sample=10)
    migrate_up(dsn)
    check(conn)


# -- a property: whatever happens to the queue, positions are a recount ----------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(PRIORITIES), st.sampled_from(JOB_TYPES),
                  st.sampled_from([1, 2, 40, ENDS, 2 * ENDS + 1, 150]), st.sampled_from([0, 0, 5, 3600, -60]),
                  st.sampled_from([0, 0, 3600])),
        st.tuples(st.just("claim"), st.integers(1, 50)),
        st.tuples(st.sampled_from(["cancel", "delete", "renderer", "created"]), st.integers(0, 10_000)),
        st.tuples(st.just("priority"), st.integers(0, 10_000), st.sampled_from(PRIORITIES)),
        st.tuples(st.just("outcome"), st.integers(0, 10_000), st.sampled_from(["queued", "completed", "failed"])),
    ),
    min_size=1, max_size=12)


@given(ops=operations)
def test_positions_are_a_recount_whatever_happens(conn: Conn, ops: list[tuple[Any, ...]]) -> None:
    conn.execute("TRUNCATE reactor.jobs")
    held: list[tuple[uuid.UUID, int]] = []
    for op in ops:
        row = conn.execute("SELECT count(*) FROM reactor.jobs WHERE status = 'queued'").fetchone()
        queued = row is not None and row[0] > 0
        if op[0] == "insert":
            _, priority, job_type, n, created_ago_s, delay_s = op
            insert(conn, n, priority=priority, job_type=job_type, created_ago_s=created_ago_s, delay_s=delay_s)
        elif op[0] == "claim":
            held += claim(conn, op[1])
        elif op[0] == "outcome" and held:
            finish(conn, held.pop(op[1] % len(held)), op[2], delay_s=60)
        elif queued and op[0] == "cancel":
            conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (nth_queued(conn, op[1]),))
        elif queued and op[0] == "delete":
            conn.execute("DELETE FROM jobs WHERE id = %s", (nth_queued(conn, op[1]),))
        elif queued and op[0] == "renderer":
            conn.execute("UPDATE jobs SET renderer = CASE renderer WHEN 'manim' THEN 'revideo' ELSE 'manim' END "
                         "WHERE id = %s", (nth_queued(conn, op[1]),))
        elif queued and op[0] == "created":
            conn.execute("UPDATE jobs SET created_at = created_at - make_interval(secs => %s) WHERE id = %s",
                         (op[1] % 100, nth_queued(conn, op[1])))
        elif queued and op[0] == "priority":
            conn.execute("UPDATE jobs SET priority = %s WHERE id = %s", (op[2], nth_queued(conn, op[1])))
    check(conn, sample=15)
