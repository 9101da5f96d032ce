"""The running totals, the in-flight counts, positions and the event sequence stay exact under
concurrent writers (randomized, a real PostgreSQL): inserts single and bulk, claims and outcomes
through the reactor's own statement, cancels, priority changes, a transaction kept open while
others commit, and a rollback. Checked against a recount at the end."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.integration.test_events_notify import COUNTS

Conn = psycopg.Connection[Any]
SECONDS = 8.0



#: the reactor's round trip: finish_and_claim (0004-0015), or run_cycle (0016, what the reactor calls)
CYCLE: dict[str, LiteralString] = {
    "finish_and_claim": "SELECT written, id, attempt FROM reactor.finish_and_claim(%s::jsonb, %s, %s, interval '60 s')",
    "run_cycle": "SELECT written, id, attempt FROM reactor.run_cycle(%s::jsonb, %s, %s, interval '60 s')",
}


def worker(dsn: str, seed: int, stop: threading.Event, errors: list[BaseException], cycle: str) -> None:
    rng = random.Random(seed)
    reactor = f"w{seed}"
    held: dict[str, int] = {}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                # two writers that took the same random rows in opposite orders: one gives way
                with contextlib.suppress(psycopg.errors.DeadlockDetected):
                    step(conn, rng, reactor, held, CYCLE[cycle])
    except BaseException as exc:
        errors.append(exc)


def step(conn: Conn, rng: random.Random, reactor: str, held: dict[str, int], cycle: LiteralString) -> None:
    op = rng.random()
    if op < 0.25:
        conn.execute(
            "INSERT INTO jobs (job_type, priority, payload) VALUES (%s, %s, %s)",
            (rng.choice(["doubt", "topic_short"]), rng.choice(["high", "medium", "low"]),
             json.dumps({"question": "q", "topic": "t"})))
    elif op < 0.3:
        conn.execute(
            "INSERT INTO jobs (job_type, priority, payload) SELECT "
            "(ARRAY['doubt', 'topic_short'])[1 + g %% 2], (ARRAY['high', 'medium', 'low'])[1 + g %% 3], "
            "'{\"question\": \"q\", \"topic\": \"t\"}' FROM generate_series(1, %s) g",
            (rng.randint(2, 30),))
    elif op < 0.6:
        # outcomes for some held jobs and a claim, in one statement, as the reactor does
        done = rng.sample(sorted(held), k=min(len(held), rng.randint(0, 3)))
        batch = [{"id": j, "attempt": held.pop(j), "status": rng.choice(["completed", "failed", "queued"]),
                  "result": None, "retry_count": 0, "delay_s": 0, "error_category": None,
                  "error_message": None, "error_details": None} for j in done]
        rows = conn.execute(cycle, (json.dumps(batch), reactor, rng.randint(0, 4))).fetchall()
        held.update({str(r[1]): r[2] for r in rows if not r[0]})
    elif op < 0.7:
        conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id IN (SELECT id FROM reactor.jobs "
                     "WHERE status IN ('queued', 'processing') ORDER BY random() LIMIT 2)")
    elif op < 0.8:
        conn.execute("UPDATE jobs SET priority = %s WHERE id IN (SELECT id FROM reactor.jobs "
                     "WHERE status = 'queued' ORDER BY random() LIMIT 3)",
                     (rng.choice(["high", "medium", "low"]),))
    elif op < 0.85:
        # a transaction that stays open while others commit, then commits or rolls back
        with conn.transaction(force_rollback=rng.random() < 0.3):
            conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('doubt', '{\"question\": \"q\"}')")
            time.sleep(rng.random() * 0.05)
            conn.execute("UPDATE jobs SET priority = 'high' WHERE id IN (SELECT id FROM reactor.jobs "
                         "WHERE status = 'queued' ORDER BY random() LIMIT 1)")
    else:
        conn.execute("SELECT * FROM reactor.sweep(interval '0 s', interval '3600 s')")


@pytest.mark.parametrize("cycles", ["finish_and_claim", "run_cycle", "mixed"])
def test_totals_positions_and_seq_stay_exact_under_concurrent_writers(dsn: str, db: Conn, cycles: str) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 40, max_manim_renders = 15")
    stop = threading.Event()
    errors: list[BaseException] = []
    # "mixed": half the writers on each, as during a rolling upgrade of a fleet
    threads = [threading.Thread(target=worker, args=(
        dsn, seed, stop, errors, cycles if cycles != "mixed" else ["finish_and_claim", "run_cycle"][seed % 2]))
        for seed in range(6)]
    for t in threads:
        t.start()
    # the claims' limits hold at every moment, read from the in-flight counts the claim uses
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        running = db.execute("SELECT count(*), count(*) FILTER (WHERE renderer = 'manim') FROM reactor.jobs "
                             "WHERE status = 'processing'").fetchone()
        assert running is not None and running[0] <= 40 and running[1] <= 15, running
        # the oldest queued job (found from the claims' cursors) is the one a recount finds
        with db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            oldest = db.execute("SELECT oldest_queued_at, (SELECT min(created_at) FROM reactor.jobs "
                                "WHERE status = 'queued') FROM get_queue_stats()").fetchone()
        assert oldest is not None and oldest[0] == oldest[1], oldest
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors

    with db.cursor(row_factory=dict_row) as cur:
        truth = cur.execute(COUNTS).fetchone()
        # (not the claim cursors: -infinity, where no claim moved one, is no Python datetime)
        totals = cur.execute("SELECT seq, queued, processing, processing_manim, completed, failed, cancelled, "
                             "queued_high, queued_medium, queued_low "
                             "FROM reactor.totals ORDER BY id DESC LIMIT 1").fetchone()
        counters = cur.execute("SELECT * FROM reactor.counters").fetchone()
        assert truth and totals and counters
        manim = cur.execute("SELECT count(*) AS n FROM reactor.jobs "
                            "WHERE status = 'processing' AND renderer = 'manim'").fetchone()
        assert manim
        truth["processing_manim"] = manim["n"]
    assert truth["queued"] > 0 and truth["completed"] > 0 and truth["cancelled"] > 0
    assert {k: totals[k] for k in truth} == truth
    assert {k: counters[k] for k in truth if k != "processing_manim"} == {
        k: v for k, v in truth.items() if k != "processing_manim"}
    # seq: 1..last without a gap, one event per number, the newest totals row holding the last
    seqs = [r[0] for r in db.execute("SELECT seq FROM reactor.events ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert counters["last_seq"] == totals["seq"] == seqs[-1]
    # every queued job's position is its place in claim order
    positions = db.execute(
        "SELECT queue_position, row_number() OVER (ORDER BY j.priority_rank, j.created_at, j.job_no) "
        "FROM jobs v JOIN reactor.jobs j USING (id) WHERE v.status = 'queued' ORDER BY 2").fetchall()
    assert positions and all(p == n for p, n in positions)
    # get_queue_stats() reads the same totals
    stats = db.execute("SELECT queued, processing, last_seq FROM get_queue_stats()").fetchone()
    assert stats == (truth["queued"], truth["processing"], seqs[-1])
