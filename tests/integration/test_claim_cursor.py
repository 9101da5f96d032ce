"""The claim's cursors (migration 0008) never pass a job that should be taken: the claim takes exactly
the jobs a full scan of the queue would, in the same order (priority, created_at, job_no), whatever
lands behind a cursor (a retry, an old created_at from a long transaction, a job another writer held,
one not due yet, a change of priority). Checked step by step against that full scan (the oracle)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

Conn = psycopg.Connection[Any]

ORACLE = """
SELECT id::text FROM reactor.jobs
 WHERE status = 'queued' AND run_after <= clock_timestamp()
 ORDER BY priority_rank, created_at, job_no LIMIT %s
"""


def claim(conn: Conn, n: int, reactor: str = "r") -> list[tuple[str, int]]:
    rows = conn.execute("SELECT id::text, attempt FROM reactor.claim_jobs(%s, %s, interval '60 s')",
                        (reactor, n)).fetchall()
    return [(r[0], r[1]) for r in rows]


def finish(conn: Conn, job: tuple[str, int], status: str, delay_s: float = 0.0) -> None:
    batch = [{"id": job[0], "attempt": job[1], "status": status, "result": None, "retry_count": 0,
              "delay_s": delay_s, "error_category": None, "error_message": None, "error_details": None}]
    conn.execute("SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'r', 0, interval '60 s')", (json.dumps(batch),))


def insert(conn: Conn, priority: str = "medium", job_type: str = "topic_short", created_ago_s: float = 0.0) -> str:
    row = conn.execute(
        "INSERT INTO jobs (job_type, priority, payload, created_at) "
        "VALUES (%s, %s, %s, now() - make_interval(secs => %s)) RETURNING id::text",
        (job_type, priority, json.dumps({"question": "q", "topic": "t"}), created_ago_s)).fetchone()
    assert row
    return str(row[0])


def expect(conn: Conn, n: int) -> list[str]:
    return [r[0] for r in conn.execute(ORACLE, (n,))]


@pytest.fixture
def conn(dsn: str, db: Conn) -> Conn:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 100000, max_manim_renders = 100000")
    return db


def test_what_lands_behind_a_cursor_is_still_taken_first(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("BEGIN")  # a long transaction: what it inserts is created now, committed later
        other.execute("SELECT 1")
        a, b, c = insert(conn), insert(conn), insert(conn)
        [got] = claim(conn, 1)
        assert got[0] == a
        # a retry goes back to its old place, before b
        finish(conn, got, "queued")
        assert [j for j, _ in claim(conn, 1)] == [a]
        late = insert(other)  # created before a, b and c
        assert [j for j, _ in claim(conn, 1)] == [b]
        other.execute("COMMIT")
    assert [j for j, _ in claim(conn, 1)] == [late]
    # a job held by another writer is passed over, and taken once it is free
    d, e = insert(conn), insert(conn)
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("SELECT 1 FROM reactor.jobs WHERE id = %s FOR UPDATE", (c,))
        assert [j for j, _ in claim(conn, 1)] == [d]
        other.execute("COMMIT")
    assert [j for j, _ in claim(conn, 1)] == [c]
    # a job not due yet is passed over, and taken when due
    f = insert(conn)
    conn.execute("UPDATE jobs SET run_after = now() + interval '1 hour' WHERE id = %s", (e,))
    assert [j for j, _ in claim(conn, 1)] == [f]
    conn.execute("UPDATE jobs SET run_after = now() - interval '1 s' WHERE id = %s", (e,))
    assert [j for j, _ in claim(conn, 1)] == [e]
    # an old low-priority job moved up to high comes first
    g, h = insert(conn, "low", created_ago_s=600), insert(conn)
    conn.execute("UPDATE jobs SET priority = 'high' WHERE id = %s", (g,))
    assert [j for j, _ in claim(conn, 2)] == [g, h]
    # a job moved back in its queue by hand (an older created_at) comes before the cursor: taken next
    i, k = insert(conn), insert(conn)
    assert [j for j, _ in claim(conn, 1)] == [i]
    m = insert(conn)
    conn.execute("UPDATE jobs SET created_at = now() - interval '1 day' WHERE id = %s", (m,))
    assert [j for j, _ in claim(conn, 1)] == [m]
    # and one moved to the other renderer's queue, behind that queue's cursor
    n_ = insert(conn, job_type="doubt", created_ago_s=60)
    assert [j for j, _ in claim(conn, 1)] == [n_]
    o = insert(conn, created_ago_s=120)  # older than n_, and of the other renderer (revideo)
    conn.execute("UPDATE reactor.jobs SET renderer = 'manim' WHERE id = %s", (o,))
    assert [j for j, _ in claim(conn, 1)] == [o]
    assert [j for j, _ in claim(conn, 1)] == [k]


@pytest.mark.parametrize("seed", range(3))
def test_claims_take_exactly_what_a_full_scan_would(conn: Conn, dsn: str, seed: int) -> None:
    rng = random.Random(seed)
    held: list[tuple[str, int]] = []
    busy = 0  # claims made while the queue held more than they could take: the cursors had work
    with psycopg.connect(dsn, autocommit=True) as other:
        for step in range(400):
            op = rng.random()
            if op < 0.38:
                insert(conn, rng.choice(["high", "medium", "low"]), rng.choice(["doubt", "topic_short"]),
                       created_ago_s=rng.choice([0, 0, 0, 5, 3600]))
            elif op < 0.45 and held:
                job = held.pop(rng.randrange(len(held)))
                finish(conn, job, rng.choice(["completed", "failed", "queued", "queued"]),
                       delay_s=rng.choice([0, 0, 3600]))
            elif op < 0.5:
                conn.execute("UPDATE jobs SET priority = %s WHERE id IN (SELECT id FROM reactor.jobs WHERE "
                             "status = 'queued' ORDER BY random() LIMIT 1)", (rng.choice(["high", "medium", "low"]),))
            elif op < 0.55:
                conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id IN (SELECT id FROM reactor.jobs WHERE "
                             "status = 'queued' ORDER BY random() LIMIT 1)")
            elif op < 0.6:
                conn.execute("UPDATE jobs SET run_after = now() - interval '1 s' WHERE id IN (SELECT id FROM "
                             "reactor.jobs WHERE status = 'queued' AND run_after > now() ORDER BY random() LIMIT 1)")
            elif op < 0.62:
                # a queued job moved in the queue by hand: an older created_at, or the other renderer
                conn.execute("UPDATE reactor.jobs SET created_at = created_at - interval '2 h' WHERE id IN "
                             "(SELECT id FROM reactor.jobs WHERE status = 'queued' ORDER BY random() LIMIT 1)")
            elif op < 0.65:
                conn.execute("UPDATE reactor.jobs SET renderer = CASE renderer WHEN 'manim' THEN 'revideo' "
                             "ELSE 'manim' END WHERE id IN (SELECT id FROM reactor.jobs WHERE status = 'queued' "
                             "ORDER BY random() LIMIT 1)")
            elif op < 0.68:
                # a long transaction inserts, and commits after a claim
                other.execute("BEGIN")
                insert(other, rng.choice(["high", "medium", "low"]))
                n = rng.randint(1, 3)
                want = expect(conn, n)
                got = claim(conn, n)
                assert [j for j, _ in got] == want, f"step {step}"
                held += got
                other.execute("COMMIT")
            else:
                n = rng.randint(1, 4)
                want = expect(conn, n + 1)
                got = claim(conn, n)
                assert [j for j, _ in got] == want[:n], f"step {step}"
                busy += len(want) > n
                held += got
        assert busy >= 20, busy


def test_a_claim_never_reads_the_index_of_every_job(dsn: str) -> None:
    # 0015: the query for the first job a claim passed had a range on (created_at, job_no), which the
    # planner served from jobs_created_idx (every job, by created_at) in a session that planned it
    # while the table was small; after one bulk INSERT, where every job shares created_at, each claim
    # then read every job. The range now leads with priority_rank, which only the queue's indexes have.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 10, max_manim_renders = 10")
        conn.execute("INSERT INTO jobs (job_type, payload) "
                     "SELECT 'doubt', jsonb_build_object('question', 'q' || g) FROM generate_series(1, 300) g")
        inflight = claim(conn, 10)
        before = _created_idx_scans(conn)
        for _ in range(60):
            job = inflight.pop(0)
            batch = [{"id": job[0], "attempt": job[1], "status": "completed", "result": {"video_url": "u"},
                      "retry_count": 0, "delay_s": 0}]
            rows = conn.execute("SELECT written, id::text, attempt FROM reactor.finish_and_claim("
                                "%s::jsonb, 'r', 1, interval '60 s')", (json.dumps(batch),)).fetchall()
            inflight += [(r[1], r[2]) for r in rows if not r[0]]
        assert len(inflight) == 10
        assert _created_idx_scans(conn) == before


def _created_idx_scans(conn: Conn) -> int:
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT idx_scan FROM pg_stat_user_indexes "
                       "WHERE schemaname = 'reactor' AND indexrelname = 'jobs_created_idx'").fetchone()
    assert row is not None
    return int(row[0])


# -- 0015's PL/pgSQL cursor_keys and cursor_lower give what 0008's SQL ones gave ---------------------

_0008 = Path(__file__).parents[2] / "sql" / "migrations" / "0008_claim_cursor.sql"
_BASE = datetime(2026, 12, 7, tzinfo=UTC)
keys = st.tuples(st.integers(0, 3).map(lambda s: _BASE + timedelta(seconds=s)), st.integers(1, 4))
jobs = st.lists(st.tuples(st.sampled_from(["manim", "revideo"]), st.integers(0, 2), keys), max_size=8)
lows = st.lists(st.one_of(st.none(), keys), min_size=6, max_size=6)


@pytest.fixture
def sql_0008(db: Conn) -> Conn:
    text = _0008.read_text()
    body = text[text.index("CREATE FUNCTION reactor.cursor_keys("):text.index("DROP FUNCTION reactor.append_totals(")]
    db.execute(body.replace("reactor.cursor_keys(", "pg_temp.cursor_keys_0008(")
                   .replace("reactor.cursor_lower(", "pg_temp.cursor_lower_0008("))
    return db


@given(given_jobs=jobs, cursors=st.lists(keys, min_size=6, max_size=6), low=lows)
def test_the_cursor_functions_of_0015_agree_with_those_of_0008(
        sql_0008: Conn, given_jobs: list[tuple[str, int, tuple[datetime, int]]],
        cursors: list[tuple[datetime, int]], low: list[tuple[datetime, int] | None]) -> None:
    args = ([r for r, _, _ in given_jobs], [k for _, k, _ in given_jobs],
            [at for _, _, (at, _) in given_jobs], [no for _, _, (_, no) in given_jobs])
    call = sql.SQL("SELECT (f).at, (f).no FROM (SELECT {}(%s::text[], %s::smallint[], %s::timestamptz[], "
                   "%s::bigint[]) f) s")
    assert (sql_0008.execute(call.format(sql.Identifier("reactor", "cursor_keys")), args).fetchall()
            == sql_0008.execute(call.format(sql.Identifier("pg_temp", "cursor_keys_0008")), args).fetchall())
    args2 = ([at for at, _ in cursors], [no for _, no in cursors],
             [k[0] if k else None for k in low], [k[1] if k else None for k in low])
    call = sql.SQL("SELECT (f).at, (f).no FROM (SELECT {}(%s::timestamptz[], %s::bigint[], %s::timestamptz[], "
                   "%s::bigint[]) f) s")
    assert (sql_0008.execute(call.format(sql.Identifier("reactor", "cursor_lower")), args2).fetchall()
            == sql_0008.execute(call.format(sql.Identifier("pg_temp", "cursor_lower_0008")), args2).fetchall())
