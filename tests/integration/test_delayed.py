"""Delayed jobs (issue 17, part 1): INSERT ... run_after in the future.

The job does not start before it; no reactor polls for it (the dispatcher sleeps until the earliest
due time, and NOTIFY reactor_due wakes it when an earlier one arrives); its queue_position is NULL
until due; 10,000 due at the same second start within the limits.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import running_reactor, wait_for

pytestmark = pytest.mark.anyio

Conn = psycopg.Connection[Any]


def delayed(db: Conn, seconds: float, n: int = 1) -> list[str]:
    rows = db.execute(
        "INSERT INTO jobs (job_type, payload, run_after) "
        "SELECT 'topic_short', jsonb_build_object('topic', 't' || g), now() + make_interval(secs => %s) "
        "FROM generate_series(1, %s) g RETURNING id", (seconds, n)).fetchall()
    return [str(r[0]) for r in rows]


async def test_a_delayed_job_starts_when_due_not_before_and_nothing_polls(dsn: str, db: Conn) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url) as svc:
        calls = {"claims": 0, "due": 0}
        claim, due = svc.db.finish_and_claim, svc.db.next_wakeups

        async def counting_claim(*args: Any) -> Any:
            calls["claims"] += 1
            return await claim(*args)

        async def counting_due() -> Any:
            calls["due"] += 1
            return await due()

        svc.db.finish_and_claim = counting_claim  # type: ignore[method-assign,assignment]
        svc.db.next_wakeups = counting_due  # type: ignore[method-assign]
        # the reactor is idle and knows of no due time: only the NOTIFY can tell it of this one
        far = delayed(db, 3600)[0]
        (job_id,) = delayed(db, 2.0)
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "completed")
        row = db.execute("SELECT started_at, run_after FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert row is not None
        started, run_after = row
        assert run_after <= started < run_after + timedelta(seconds=1), (started, run_after)
        # a handful of claims and due-time reads (at each insert and at the due time), not a poll
        assert calls["claims"] <= 6 and calls["due"] <= 6, calls
        assert db.execute("SELECT status FROM jobs WHERE id = %s", (far,)).fetchone() == ("queued",)


async def test_an_earlier_delayed_job_wakes_a_reactor_that_sleeps_until_a_later_one(dsn: str, db: Conn) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        later = delayed(db, 30)[0]
        await wait_for(dsn, "SELECT count(*) FROM job_events WHERE kind = 'inserted'", expect=lambda n: n == 1)
        (sooner,) = delayed(db, 1.0)
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (sooner,), expect=lambda s: s == "completed",
                       timeout=5)
        # moving a queued job's run_after by hand wakes it too
        db.execute("UPDATE jobs SET run_after = now() + interval '0.5 seconds' WHERE id = %s", (later,))
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (later,), expect=lambda s: s == "completed",
                       timeout=5)


def test_queue_position_is_null_until_due(db: Conn) -> None:
    (job_id,) = delayed(db, 3600)
    row = db.execute("SELECT status, queue_position FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("queued", None)
    db.execute("UPDATE jobs SET run_after = now() - interval '1 second' WHERE id = %s", (job_id,))
    assert db.execute("SELECT queue_position FROM jobs WHERE id = %s", (job_id,)).fetchone() == (1,)


def test_a_job_waiting_for_its_run_after_holds_no_place_ahead_of_others(db: Conn) -> None:
    delayed(db, 3600)
    row = db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"x\"}') "
                     "RETURNING id, queue_position").fetchone()
    assert row is not None
    assert row[1] == 1  # RETURNING too
    assert db.execute("SELECT queue_position FROM jobs WHERE id = %s", (row[0],)).fetchone() == (1,)


def test_due_positions_leave_out_every_waiting_job_at_any_depth_and_priority(db: Conn) -> None:
    # 300 medium jobs, every third of them waiting (far from the ends and near them), 5 high ones
    # of which 2 wait, and a retrying job (queued with its backoff ahead): the due jobs are numbered
    # 1..n in queue order as if the waiting ones were not there
    db.execute(
        "INSERT INTO jobs (job_type, priority, payload, run_after) "
        "SELECT 'topic_short', CASE WHEN g <= 5 THEN 'high' ELSE 'medium' END, jsonb_build_object('topic', 't' || g), "
        "       CASE WHEN g IN (2, 4) OR (g > 5 AND g % 3 = 0) THEN now() + interval '1 hour' ELSE now() END "
        "FROM generate_series(1, 305) g")
    db.execute("UPDATE jobs SET run_after = now() + interval '10 minutes', retry_count = 1 "
               "WHERE id = (SELECT id FROM jobs WHERE payload->>'topic' = 't7')")
    rows = db.execute(
        "SELECT j.queue_position, j.run_after <= now() AS due FROM jobs j "
        "JOIN reactor.jobs r ON r.id = j.id WHERE j.status = 'queued' "
        "ORDER BY r.priority_rank, r.created_at, r.job_no").fetchall()
    due = [p for p, is_due in rows if is_due]
    assert due == list(range(1, len(due) + 1))
    assert all(p is None for p, is_due in rows if not is_due)
    assert len(due) == 305 - 2 - 100 - 1
    # one job read alone, deep in the queue, agrees with the listing
    (job_id, listed) = db.execute(
        "SELECT id, queue_position FROM jobs WHERE payload->>'topic' = 't200'").fetchone() or (None, None)
    assert listed is not None
    assert db.execute("SELECT queue_position FROM jobs WHERE id = %s", (job_id,)).fetchone() == (listed,)
    # when the waiting jobs fall due they take their places again
    db.execute("UPDATE jobs SET run_after = now() WHERE status = 'queued'")
    rows = db.execute(
        "SELECT j.queue_position FROM jobs j JOIN reactor.jobs r ON r.id = j.id "
        "ORDER BY r.priority_rank, r.created_at, r.job_no").fetchall()
    assert [p for (p,) in rows] == list(range(1, 306))


async def test_ten_thousand_delayed_jobs_due_at_the_same_second_start_within_the_limits(dsn: str, db: Conn) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 8, max_manim_renders = 4")
    db.execute(
        "INSERT INTO jobs (job_type, payload, run_after) "
        "SELECT CASE WHEN g % 4 = 0 THEN 'doubt' ELSE 'topic_short' END, "
        "       jsonb_build_object('question', 'q' || g, 'topic', 't' || g), "
        "       date_trunc('second', now()) + interval '4 seconds' "
        "FROM generate_series(1, 10000) g")
    from dataclasses import replace

    from tests.support.reactors import FAST_DISPATCH

    six = replace(FAST_DISPATCH, max_inflight=6)
    async with OrchestratorDouble(latency_ms=0) as orch, \
            running_reactor(dsn, orch.url, reactor_id="a", dispatch=six), \
            running_reactor(dsn, orch.url, reactor_id="b", dispatch=six):
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 10000,
                       timeout=240)
        stats = orch.stats()
    assert stats["max_in_flight"] <= 8
    assert stats["max_in_flight_by_type"]["doubt"] <= 4
    early = db.execute("SELECT count(*) FROM jobs WHERE started_at < run_after").fetchone()
    assert early == (0,)
    # each job rendered once
    assert db.execute("SELECT count(*) FROM job_events WHERE kind = 'started'").fetchone() == (10000,)
    first = db.execute("SELECT min(started_at) - min(run_after) FROM jobs").fetchone()
    assert first is not None and first[0] < timedelta(seconds=1)
