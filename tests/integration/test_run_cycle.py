"""reactor.run_cycle() (0016, 0018): the reactor's round trip with one journal write does what the three
calls it replaces did (finish_settle_and_claim(), which calls finish_and_claim() and claim_jobs()):
the same rows written and claimed, the same events in the same order, the same totals and claim
cursors, the same render-cache words. Two databases take the same seeded random steps (inserts behind
the cursors, outcomes of every kind with their cache keys, not-due retries, cancels, priority changes,
limits, two reactors), one through each path, and are compared after every step and at the end.
Then the one NOTIFY per transaction that run_cycle() sends."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import migrate_up
from tests.integration.test_events_notify import COUNTS, assert_silent, receive

Conn = psycopg.Connection[Any]

OLD: LiteralString = ("SELECT * FROM reactor.finish_settle_and_claim(%s::jsonb, %s, %s, interval '60 s', "
                      "now(), '{\"style\": \"s\", \"length\": \"short\", \"voice\": \"v\"}')")
NEW: LiteralString = ("SELECT * FROM reactor.run_cycle(%s::jsonb, %s, %s, interval '60 s', "
                      "now(), '{\"style\": \"s\", \"length\": \"short\", \"voice\": \"v\"}')")
BASE = datetime(2026, 12, 7, tzinfo=UTC)


@pytest.fixture
def pair(pg_server: EmbeddedPostgres) -> Iterator[tuple[Conn, Conn]]:
    names = [f"cycle_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        conns = []
        for name in names:
            migrate_up(pg_server.dsn_for(name))
            conn = psycopg.connect(pg_server.dsn_for(name), autocommit=True, row_factory=dict_row)
            conn.execute("SET reactor.actor = 'reactor:test'")
            conns.append(conn)
        yield conns[0], conns[1]
        for conn in conns:
            conn.close()
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            for name in names:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Side:
    """One database and the path it takes; job ids are per database, job numbers are the same."""

    def __init__(self, conn: Conn, call: LiteralString) -> None:
        self.conn, self.call = conn, call

    def no(self, ids: list[Any]) -> dict[str, int]:
        found = self.conn.execute("SELECT id::text, job_no FROM reactor.jobs WHERE id = ANY(%s)", (ids,)).fetchall()
        return {r["id"]: r["job_no"] for r in found}

    def id_of(self, job_no: int) -> str:
        row = self.conn.execute("SELECT id::text FROM reactor.jobs WHERE job_no = %s", (job_no,)).fetchone()
        assert row
        return str(row["id"])

    def cycle(self, reactor: str, outcomes: list[dict[str, Any]], max_jobs: int) -> list[tuple[Any, ...]]:
        batch = [{**o, "id": self.id_of(o["job_no"])} for o in outcomes]
        for o in batch:
            del o["job_no"]
        got = self.conn.execute(self.call, (json.dumps(batch), reactor, max_jobs)).fetchall()
        nos = self.no([r["id"] for r in got])
        return [(r["written"], nos[str(r["id"])], r["attempt"], r["job_type"], r["priority"], r["renderer"],
                 r["retry_count"], r["timeout_minutes"], r["cache_key"], r["cache_state"]) for r in got]

    def state(self) -> dict[str, Any]:
        c = self.conn
        return {
            # the stamps as jobs_before_write sets them (0018: run_cycle sets them itself), relative
            # to the writing transaction's now(), which differs between the two databases
            "jobs": c.execute("SELECT job_no, status, attempt, retry_count, priority, locked_by, cache_key, "
                              "run_after > now() AS later, result - 'cached_from' AS result, "
                              "result ? 'cached_from' AS cached, started_at IS NULL AS unstarted, "
                              "started_at = updated_at AS started_then, completed_at IS NULL AS open, "
                              "completed_at = updated_at AS completed_then, "
                              "lease_expires_at - updated_at AS lease FROM reactor.jobs ORDER BY job_no").fetchall(),
            "events": c.execute("SELECT e.seq, j.job_no, e.kind, e.status, e.old_status, e.priority, e.job_type, "
                                "e.renderer, e.retry_count, e.error_category, e.actor FROM reactor.events e "
                                "LEFT JOIN reactor.jobs j ON j.id = e.job_id ORDER BY e.seq").fetchall(),
            "totals": c.execute("SELECT seq, queued, processing, processing_manim, completed, failed, cancelled, "
                                "queued_high, queued_medium, queued_low, cursor_at::text, cursor_no "
                                "FROM reactor.totals ORDER BY id DESC LIMIT 1").fetchone(),
            "cache": c.execute("SELECT c.key, c.status, j.job_no FROM reactor.render_cache c "
                               "LEFT JOIN reactor.jobs j ON j.id = c.job_id ORDER BY c.key").fetchall(),
            "recount": c.execute(COUNTS).fetchone(),
        }


def run_steps(old: Side, new: Side, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    held: dict[str, dict[int, tuple[int, str | None]]] = {"r1": {}, "r2": {}}  # job_no -> (attempt, cache key)
    for side in (old, new):
        side.conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 6, max_manim_renders = 3")
    for step in range(steps):
        op = rng.random()
        if op < 0.3:
            # jobs, some created before others already taken (behind the claims' cursors)
            jobs = [(rng.choice(["doubt", "topic_short", "daily_ca"]), rng.choice(["high", "medium", "low"]),
                     BASE + timedelta(seconds=rng.randint(0, 40)), rng.randint(0, 3)) for _ in range(rng.randint(1, 4))]
            for side in (old, new):
                for job_type, priority, at, topic in jobs:
                    side.conn.execute(
                        "INSERT INTO jobs (job_type, priority, payload, created_at) VALUES (%s, %s, %s, %s)",
                        (job_type, priority, json.dumps({"question": f"q{topic}", "topic": f"t{topic}",
                                                         "date": "2026-12-07"}), at))
        elif op < 0.8:
            reactor = rng.choice(["r1", "r2"])
            mine = held[reactor]
            done = rng.sample(sorted(mine), k=min(len(mine), rng.randint(0, 3)))
            outcomes = []
            for job_no in done:
                attempt, key = mine.pop(job_no)
                status = rng.choice(["completed", "completed", "failed", "queued", "queued", "cancelled"])
                outcomes.append({
                    "job_no": job_no, "attempt": attempt, "status": status,
                    "result": {"video_url": f"https://v/{job_no}.mp4"} if status == "completed" else None,
                    "retry_count": 1 if status == "queued" else 0,
                    "delay_s": rng.choice([0, 0, 3600]) if status == "queued" else 0,
                    "error_category": "API_ERROR" if status in ("failed", "queued") else None,
                    "error_message": None, "error_details": None, "cache_key": key})
            if rng.random() < 0.1 and mine:
                # an outcome for an attempt that is not the one held: written by neither
                job_no = next(iter(mine))
                outcomes.append({"job_no": job_no, "attempt": mine[job_no][0] + 1, "status": "completed",
                                 "result": None, "retry_count": 0, "delay_s": 0})
            max_jobs = rng.randint(0, 4)
            got_old = old.cycle(reactor, outcomes, max_jobs)
            got_new = new.cycle(reactor, outcomes, max_jobs)
            assert got_new == got_old, f"seed {seed} step {step}"
            for written, job_no, attempt, *_, key, _state in got_new:
                if not written:
                    mine[job_no] = (attempt, key)
        elif op < 0.88:
            pick = rng.randint(0, 5)
            for side in (old, new):
                side.conn.execute("UPDATE jobs SET status = 'cancelled' WHERE id = (SELECT id FROM reactor.jobs "
                                  "WHERE status = 'queued' ORDER BY job_no OFFSET %s LIMIT 1)", (pick,))
        elif op < 0.96:
            pick, priority = rng.randint(0, 5), rng.choice(["high", "medium", "low"])
            for side in (old, new):
                side.conn.execute("UPDATE jobs SET priority = %s WHERE id = (SELECT id FROM reactor.jobs "
                                  "WHERE status = 'queued' ORDER BY job_no OFFSET %s LIMIT 1)", (priority, pick))
        else:
            limits = (rng.randint(0, 8), rng.randint(0, 4))
            for side in (old, new):
                side.conn.execute("UPDATE job_queue_config SET max_concurrent_renders = %s, max_manim_renders = %s",
                                  limits)
        if step % 10 == 9:
            assert new.state() == old.state(), f"seed {seed} step {step}"
    a, b = old.state(), new.state()
    assert b == a
    truth = dict(b["recount"])
    assert {k: b["totals"][k] for k in truth} == truth
    assert sum(1 for e in b["events"] if e["kind"] == "started") > 20
    assert {e["kind"] for e in b["events"]} >= {"inserted", "started", "completed", "failed", "retrying", "cancelled"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_run_cycle_does_what_the_three_calls_it_replaces_did(pair: tuple[Conn, Conn], seed: int) -> None:
    old, new = Side(pair[0], OLD), Side(pair[1], NEW)
    run_steps(old, new, seed, 160)


# -- one NOTIFY per transaction ------------------------------------------------------------------------


@pytest.fixture
def chan(dsn: str) -> Iterator[Conn]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN reactor_events")
        conn.execute("LISTEN reactor_log")  # receive() says which channel each came on
        yield conn


def _call(db: Conn, batch: list[dict[str, Any]], max_jobs: int, reactor: str = "r1") -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(NEW, (json.dumps(batch), reactor, max_jobs)).fetchall()


def _done(row: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"id": str(row["id"]), "attempt": row["attempt"], "status": status,
            "result": {"video_url": "u"} if status == "completed" else None,
            "retry_count": 1 if status == "queued" else 0, "delay_s": 0,
            "error_category": None if status == "completed" else "API_ERROR"}


def test_run_cycle_sends_one_notify_per_transaction(db: Conn, chan: Conn) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 3, max_manim_renders = 3")
    db.execute("INSERT INTO jobs (job_type, payload) "
               "SELECT 'doubt', '{\"question\": \"q\"}' FROM generate_series(1, 6)")
    receive(chan, 1)
    seq = db.execute("SELECT last_seq FROM reactor.counters").fetchone()
    assert seq

    # a claim of one job: that event, whole
    [a] = _call(db, [], 1)
    [msg] = receive(chan, 1)
    assert (msg["n"], msg["kind"], msg["id"], msg["seq"]) == (1, "started", str(a["id"]), seq[0] + 1)
    assert "claiming" not in msg and msg.get("more") is True  # took its max, the fleet has room left

    # outcomes and a claim: one notice with the counts, "claiming"
    b, c = _call(db, [], 2)
    receive(chan, 1)
    got = _call(db, [_done(a), _done(b, "queued")], 2)
    assert sorted(r["written"] for r in got) == [False, False, True, True]
    [msg] = receive(chan, 1)
    assert {k: msg[k] for k in ("n", "q", "f", "c", "claiming")} == {"n": 4, "q": 1, "f": 2, "c": 0, "claiming": True}
    assert msg["seq"] == seq[0] + 7 and "more" not in msg  # the fleet is full again
    assert_silent(chan)

    # one outcome and nothing to claim (a draining reactor): that event whole, no "claiming"
    _call(db, [_done(c)], 0)
    [msg] = receive(chan, 1)
    assert (msg["n"], msg["kind"], msg["id"]) == (1, "completed", str(c["id"])) and "claiming" not in msg

    # nothing written, nothing claimed: nothing journalled, nothing sent
    assert _call(db, [_done(c)], 0) == []
    assert_silent(chan)
    events = db.execute("SELECT count(*), max(seq) FROM reactor.events").fetchone()
    totals = db.execute("SELECT seq FROM reactor.totals ORDER BY id DESC LIMIT 1").fetchone()
    assert events and totals and events[1] == totals[0] == seq[0] + 8 and events[0] == seq[0] + 8


def test_a_cycle_that_gives_nobody_else_work_goes_on_reactor_log(db: Conn, chan: Conn) -> None:
    """Migration 0017: outcomes all finished, their room claimed again by the same transaction, no
    "more": reactor_log, which dispatchers do not follow. Anything another reactor may act on
    (a lone claim, a retry, outcomes with no claim after them, "more") stays on reactor_events."""
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 2, max_manim_renders = 2")
    db.execute("INSERT INTO jobs (job_type, payload) SELECT 'doubt', '{\"question\": \"q\"}' "
               "FROM generate_series(1, 3)")
    receive(chan, 1)

    a, b = _call(db, [], 2)  # a lone claim: the sweeps learn of the leases from it
    receive(chan, 1, "reactor_events")
    [c] = [r for r in _call(db, [_done(a)], 1) if not r["written"]]  # a finished, its room taken again
    [msg] = receive(chan, 1, "reactor_log")
    assert {k: msg[k] for k in ("n", "f", "q", "claiming")} == {"n": 2, "f": 1, "q": 0, "claiming": True}
    assert "more" not in msg

    # a failure, and nothing left to claim: that event whole, still nobody else's business
    assert [r["written"] for r in _call(db, [_done(b, "failed")], 1)] == [True]
    [msg] = receive(chan, 1, "reactor_log")
    assert (msg["n"], msg["kind"], msg["id"], msg["claiming"]) == (1, "failed", str(b["id"]), True)

    # a retry: others may need to re-read their next due time
    got = _call(db, [_done(c, "queued")], 1)
    [msg] = receive(chan, 1, "reactor_events")
    assert msg["q"] == 1 if msg["n"] > 1 else msg["kind"] == "retrying"
    c2 = [r for r in got if not r["written"]]

    # a claim that filled what it asked for with room left in the fleet: "more", for the others
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 6")
    db.execute("INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 'm' || g) "
               "FROM generate_series(1, 4) g")
    receive(chan, 1, "reactor_events")
    held = c2 or _call(db, [], 1)
    if not c2:
        receive(chan, 1, "reactor_events")
    _call(db, [_done(held[0])], 1)
    [msg] = receive(chan, 1, "reactor_events")
    assert msg.get("more") is True and msg["claiming"] is True

    # outcomes with no claim after them (a draining reactor): their room is for the others
    rows = db.execute("SELECT id, attempt FROM reactor.jobs WHERE status = 'processing'").fetchall()
    assert rows
    _call(db, [_done({"id": i, "attempt": n}) for i, n in rows], 0)
    [msg] = receive(chan, 1, "reactor_events")
    assert "claiming" not in msg
    assert_silent(chan)
