"""The reactor against a real PostgreSQL and the orchestrator double over real HTTP."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
import pytest

from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.processes import until
from tests.support.reactors import running_reactor, wait_for

pytestmark = pytest.mark.anyio


_N = itertools.count(1)


def insert(db: psycopg.Connection[Any], job_type: str = "doubt", payload: dict[str, Any] | None = None,
           priority: str = "medium", max_retries: int = 3) -> str:
    field = {"doubt": "question", "topic_short": "topic", "daily_ca": "date"}[job_type]
    # a different input each time: identical topic_short jobs would share one render (the cache)
    body = payload if payload is not None else {field: f"why is the sky blue? ({next(_N)})"}
    row = db.execute(
        "INSERT INTO jobs (job_type, priority, payload, max_retries) VALUES (%s, %s, %s, %s) RETURNING id",
        (job_type, priority, json.dumps(body), max_retries),
    ).fetchone()
    assert row
    return str(row[0])


def job(db: psycopg.Connection[Any], job_id: str) -> dict[str, Any]:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row
    return row


async def test_job_inserted_by_sql_completes(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        job_id = insert(db, "topic_short", {"topic": "Photosynthesis", "voice": "asha"})
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "completed")
    row = job(db, job_id)
    assert row["result"]["video_url"].endswith(f"/videos/{job_id}.mp4")
    assert row["result"]["processing_time_ms"] >= 0
    assert row["started_at"] is not None and row["completed_at"] is not None
    assert row["locked_by"] is None and row["lease_expires_at"] is None
    [req] = orch.requests
    assert req["job_id"] == job_id
    assert (req["job_type"], req["input"], req["style"], req["length"], req["voice"]) == (
        "topic_short", "Photosynthesis", "default", "short", "asha")
    kinds = [r[0] for r in db.execute("SELECT kind FROM job_events WHERE job_id = %s ORDER BY seq", (job_id,))]
    assert kinds == ["inserted", "started", "completed"]


async def test_start_order_follows_priority(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # paused
    async with OrchestratorDouble(latency_ms=20) as orch, running_reactor(dsn, orch.url):
        ids = {p: insert(db, "topic_short", priority=p) for p in ("low", "medium", "high")}
        second_high = insert(db, "topic_short", priority="high")
        await anyio.sleep(0.3)
        assert orch.requests == []  # paused: nothing starts
        db.execute("UPDATE job_queue_config SET max_concurrent_renders = 1")
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 4)
    order = [r["job_id"] for r in orch.requests]
    assert order == [ids["high"], second_high, ids["medium"], ids["low"]]
    assert orch.stats()["max_in_flight"] == 1


async def test_two_reactors_respect_limits_and_live_updates(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 3, max_manim_renders = 2")
    db.execute(
        "INSERT INTO jobs (job_type, payload) SELECT CASE WHEN g % 2 = 0 THEN 'doubt' ELSE 'topic_short' END, "
        "jsonb_build_object('question', 'q' || g, 'topic', 't' || g) FROM generate_series(1, 200) g"
    )
    # each reactor may hold 2 renders at most, so the fleet limit of 3 needs both of them
    from dataclasses import replace

    from tests.support.reactors import FAST_DISPATCH

    two = replace(FAST_DISPATCH, max_inflight=2)
    async with OrchestratorDouble(latency_ms=30, jitter_ms=30) as orch:
        async with running_reactor(dsn, orch.url, reactor_id="r1", dispatch=two), \
                running_reactor(dsn, orch.url, reactor_id="r2", dispatch=two):
            await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n >= 60)
            stats = orch.stats()
            assert stats["max_in_flight"] == 3
            assert stats["max_in_flight_by_type"]["doubt"] <= 2
            # raise the limits while running: no restart needed
            db.execute("UPDATE job_queue_config SET max_concurrent_renders = 8, max_manim_renders = 8")
            orch.reset()
            await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 200)
            assert orch.stats()["max_in_flight"] == 4  # 8 allowed now, but 2 reactors x 2 each
        holders = {r[0] for r in db.execute("SELECT DISTINCT actor FROM job_events WHERE kind = 'started'")}
    assert holders == {"reactor:r1", "reactor:r2"}
    # no job rendered twice
    assert db.execute("SELECT count(*) FROM job_events WHERE kind = 'started'").fetchone() == (200,)


async def test_manim_limit_does_not_hold_back_other_renderers(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 4, max_manim_renders = 1")
    manim = [insert(db, "doubt", {"question": "[[latency=1500]] q"}) for _ in range(3)]
    other = insert(db, "topic_short", priority="low")
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (other,), expect=lambda s: s == "completed")
        # the low-priority revideo job finished while the manim jobs queued ahead of it waited their turn
        statuses = [job(db, m)["status"] for m in manim]
        assert statuses.count("completed") == 0
        assert orch.stats()["max_in_flight_by_type"]["doubt"] == 1


async def test_peak_hours_scale_the_limits(dsn: str, db: psycopg.Connection[Any]) -> None:
    # twelve identical jobs, rendered twice: each must render (not come from the render cache)
    db.execute("UPDATE job_types SET cache_ttl = NULL")
    db.execute(
        "UPDATE job_queue_config SET max_concurrent_renders = 2, max_manim_renders = 2, "
        "peak_hour_start = '18:00', peak_hour_end = '22:00', peak_worker_multiplier = 2.5, "
        "timezone = 'Asia/Kolkata'"
    )
    # 20:00 in Kolkata is 14:30 UTC
    in_peak = datetime(2026, 11, 22, 14, 30, tzinfo=UTC)
    row = db.execute("SELECT max_renders, max_manim, peak FROM reactor.effective_limits(%s)", (in_peak,)).fetchone()
    assert row == (5, 5, True)
    db.execute(
        "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', '{\"topic\": \"[[latency=400]] t\"}' "
        "FROM generate_series(1, 12)"
    )
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url, clock=lambda: in_peak):
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 12)
    assert orch.stats()["max_in_flight"] == 5
    off_peak = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
    db.execute("UPDATE jobs SET status = 'queued'")
    async with OrchestratorDouble() as orch2, running_reactor(dsn, orch2.url, clock=lambda: off_peak):
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 12)
    assert orch2.stats()["max_in_flight"] == 2


@pytest.mark.parametrize(
    ("marker", "category", "final_status", "retries", "max_retries"),
    [
        ("[[status=500]]", "API_ERROR", "failed", 2, 2),
        ("[[status=502]]", "API_ERROR", "failed", 1, 1),
        ("[[status=400]]", "INVALID_INPUT", "failed", 0, 3),
        ("[[status=422]]", "INVALID_INPUT", "failed", 0, 3),
        ("[[status=404]]", "NOT_FOUND", "failed", 0, 3),
        ("[[malformed]]", "UNKNOWN", "failed", 1, 1),
        ("[[garbage]]", "UNKNOWN", "failed", 1, 1),
        ("[[reset]]", "TIMEOUT", "failed", 1, 1),
        ("[[hang]]", "TIMEOUT", "failed", 1, 1),
        ("[[fail_first=2:status=503]]", None, "completed", 2, 3),
    ],
)
async def test_error_categories(
    dsn: str, db: psycopg.Connection[Any], marker: str, category: str | None, final_status: str,
    retries: int, max_retries: int,
) -> None:
    from dataclasses import replace

    from tests.support.reactors import FAST_DISPATCH

    # the per-job rules alone: no circuit breaker, no free requeues for outage-like failures
    # (502, reset, hang are outage-like; tests/integration/test_circuit.py covers that side)
    settings = replace(FAST_DISPATCH, max_render_timeout_s=0.5, free_requeues=0, circuit_threshold=1000)
    async with OrchestratorDouble(retry_after_s=0.1) as orch, running_reactor(dsn, orch.url, dispatch=settings):
        job_id = insert(db, "doubt", {"question": f"q {marker}"}, max_retries=max_retries)
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,),
                       expect=lambda s: s in ("completed", "failed"))
    row = job(db, job_id)
    assert row["status"] == final_status
    assert row["retry_count"] == retries
    assert len([r for r in orch.requests if r["job_id"] == job_id]) == retries + 1
    if category is None:
        assert row["error_category"] is None and row["result"]["video_url"]
        kinds = [r[0] for r in db.execute("SELECT kind FROM job_events WHERE job_id = %s ORDER BY seq", (job_id,))]
        assert kinds == ["inserted", "started", "retrying", "started", "retrying", "started", "completed"]
    else:
        assert row["error_category"] == category
        assert row["error_message"]
        assert row["error_details"]["attempt"] == retries + 1
        if marker.startswith("[[status"):
            assert row["error_details"]["status_code"] == int(marker[9:12])


async def test_retry_after_is_honoured(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with OrchestratorDouble(retry_after_s=1.5) as orch, running_reactor(dsn, orch.url):
        job_id = insert(db, "doubt", {"question": "[[fail_first=1:status=503]] q"})
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "completed")
    first, second = [r for r in orch.requests if r["job_id"] == job_id]
    assert second["received_at"] - first["received_at"] >= 1.5
    events = db.execute(
        "SELECT kind FROM job_events WHERE job_id = %s ORDER BY seq", (job_id,)).fetchall()
    assert [e[0] for e in events] == ["inserted", "started", "retrying", "started", "completed"]


async def test_bad_payload_fails_that_job_only(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        bad = insert(db, "doubt", {"topic": "no question here"})
        worse = insert(db, "doubt", {"question": "   "})  # (one not text is refused at INSERT: test_poison)
        good = insert(db, "doubt")
        for j in (bad, worse, good):
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (j,),
                           expect=lambda s: s in ("completed", "failed"))
    assert job(db, bad)["status"] == "failed"
    assert job(db, bad)["error_category"] == "INVALID_INPUT"
    assert "payload.question is required" in job(db, bad)["error_message"]
    assert job(db, worse)["error_category"] == "INVALID_INPUT"
    assert job(db, good)["status"] == "completed"
    assert [r["job_id"] for r in orch.requests] == [good]


async def test_sweep_takes_back_a_job_stuck_in_processing(dsn: str, db: psycopg.Connection[Any]) -> None:
    job_id = insert(db, "doubt")
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    db.execute(
        "UPDATE jobs SET status = 'processing', started_at = now() - interval '15 minutes' WHERE id = %s", (job_id,))
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "queued")
        row = job(db, job_id)
        assert row["retry_count"] == 1
        assert row["error_category"] == "TIMEOUT"
        assert "timed out" in row["error_message"]
        db.execute("UPDATE job_queue_config SET max_concurrent_renders = 10")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "completed")
    assert len(orch.requests) == 1


async def test_sweep_fails_a_stuck_job_with_no_retries_left(dsn: str, db: psycopg.Connection[Any]) -> None:
    job_id = insert(db, "doubt", max_retries=0)
    db.execute(
        "UPDATE jobs SET status = 'processing', started_at = now() - interval '15 minutes' WHERE id = %s", (job_id,))
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "failed")
    assert job(db, job_id)["error_category"] == "TIMEOUT"
    assert orch.requests == []


async def test_paused_dispatch_spends_no_claim_on_new_jobs(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url) as service:
        # count this reactor's own calls and notices; the database and the double stay real
        calls = {"claims": 0, "notices": 0}
        store, dispatcher = service.db, service.dispatcher
        claim, notice = store.finish_and_claim, dispatcher.on_notice

        async def counting_claim(*args: Any) -> Any:
            calls["claims"] += 1
            return await claim(*args)

        def counting_notice(n: Any) -> None:
            calls["notices"] += 1
            notice(n)

        store.finish_and_claim = counting_claim  # type: ignore[method-assign,assignment]
        dispatcher.on_notice = counting_notice  # type: ignore[method-assign,assignment]
        await until(lambda: dispatcher.paused, "the pause read at start", timeout=20)
        ids = [insert(db, "topic_short") for _ in range(20)]
        await until(lambda: calls["notices"] >= 20, "a notice per insert", timeout=20)
        await anyio.sleep(0.3)  # the dispatcher has had every wake-up
        assert calls["claims"] == 0 and orch.requests == []
        db.execute("UPDATE job_queue_config SET max_concurrent_renders = 5")  # resume: one NOTIFY
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 20)
    assert calls["claims"] > 0
    assert sorted(r["job_id"] for r in orch.requests) == sorted(ids)


async def test_a_wake_up_during_a_sweep_is_not_lost(dsn: str, db: psycopg.Connection[Any]) -> None:
    """Work that starts while a sweep runs must still make the sweep learn its lease: the sweep's
    answer (no lease) predates the claim, and must not cancel the wake-up the claim caused."""
    async with OrchestratorDouble(latency_ms=60_000) as orch, \
            running_reactor(dsn, orch.url, sweep_every_s=30.0) as service:
        real_sweep = service.db.sweep
        sweeps: list[float] = []
        gate = anyio.Event()

        async def held_sweep(*args: Any) -> Any:
            result = await real_sweep(*args)  # the database's answer, taken now
            sweeps.append(time.monotonic())
            if len(sweeps) == 1:
                await gate.wait()  # ... and handed back only after the job below has started
            return result

        service.db.sweep = held_sweep  # type: ignore[method-assign,assignment]
        service.sweeper.wake()  # sweep now (the start-up sweep saw no lease)
        await until(lambda: bool(sweeps), "the first sweep", timeout=20)
        job_id = insert(db, "topic_short")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "processing")
        await until(lambda: bool(orch.requests), "the render request", timeout=20)
        released = time.monotonic()
        gate.set()
        await until(lambda: len(sweeps) >= 2, "the second sweep", timeout=10)  # not the next regular one, 30 s on
        assert sweeps[1] - released < 10
        assert service.sweeper.knows_leases


async def test_a_claim_on_its_way_when_the_stop_comes_is_not_left_held(dsn: str, db: psycopg.Connection[Any]) -> None:
    """A stop that arrives while a claim waits on the database: the drain waits for the claim, and
    what it took is rendered (or released), never left in processing under a reactor that is gone."""
    blocker = psycopg.connect(dsn)
    try:
        async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url) as svc:
            blocker.execute("SELECT pg_advisory_xact_lock(7240513002)")  # the claims' lock
            job_id = insert(db, "topic_short")
            await wait_for(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                           expect=lambda n: n >= 1)
            svc.request_stop()
            await anyio.sleep(0.3)  # the drain has begun, the claim still waits
            blocker.rollback()
    finally:
        blocker.close()
    row = job(db, job_id)
    assert (row["status"], row["locked_by"]) == ("completed", None)


async def test_cancelled_queued_job_never_starts(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url):
        job_id = insert(db, "doubt")
        keep = insert(db, "doubt")
        db.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (job_id,))
        db.execute("UPDATE job_queue_config SET max_concurrent_renders = 10")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (keep,), expect=lambda s: s == "completed")
    assert [r["job_id"] for r in orch.requests] == [keep]
    assert job(db, job_id)["status"] == "cancelled"


async def test_cancelling_a_processing_job_aborts_its_render(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url) as service:
        job_id = insert(db, "doubt", {"question": "[[latency=60000]] slow"})
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "processing")
        await wait_for(dsn, "SELECT 1", expect=lambda _: orch.stats()["in_flight"] == 1)
        db.execute("UPDATE jobs SET status = 'cancelled' WHERE id = %s", (job_id,))
        with anyio.fail_after(1.0):  # within a second
            while orch.stats()["aborted"] < 1:
                await anyio.sleep(0.02)
        await wait_for(dsn, "SELECT 1", expect=lambda _: not service.dispatcher.inflight)
    row = job(db, job_id)
    assert row["status"] == "cancelled"
    assert row["result"] is None
    assert orch.requests[0]["aborted"] is True


async def test_outcome_of_a_rescued_attempt_is_discarded(dsn: str, db: psycopg.Connection[Any]) -> None:
    """A reactor whose job was taken over cannot overwrite the newer attempt."""
    async with OrchestratorDouble(latency_ms=3000) as orch, running_reactor(dsn, orch.url, reactor_id="old") as svc:
        job_id = insert(db, "doubt")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job_id,), expect=lambda s: s == "processing")
        # the claim's commit is seen before the reactor has the job in flight: wait for its render call
        await wait_for(dsn, "SELECT 1", expect=lambda _: bool(svc.dispatcher.inflight), timeout=10)
        # someone else took it over meanwhile (as the sweep would after a lease expiry)
        db.execute("UPDATE reactor.jobs SET locked_by = 'new', attempt = attempt + 1 WHERE id = %s", (job_id,))
        await wait_for(dsn, "SELECT 1", expect=lambda _: not svc.dispatcher.inflight, timeout=10)
        assert svc.dispatcher.stats.discarded == 1
    row = job(db, job_id)
    assert row["status"] == "processing" and row["locked_by"] == "new" and row["result"] is None
