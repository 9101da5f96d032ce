"""The circuit breaker with the orchestrator double: outages do not fail students' jobs."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio
import psycopg
import pytest

from reactor.core.circuit import CLOSED, HALF_OPEN, OPEN
from reactor.service import Service
from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import FAST_DISPATCH, running_reactor, wait_for

pytestmark = pytest.mark.anyio

CIRCUIT = replace(FAST_DISPATCH, probe_base_s=0.5, probe_cap_s=5.0, circuit_threshold=5, max_inflight=8)


def count_probes(service: Service) -> list[float]:
    """Wrap the service's health probe to record when each probe ran."""
    times: list[float] = []
    inner = service.dispatcher.probe
    assert inner is not None

    async def probe() -> bool:
        times.append(time.monotonic())
        return await inner()

    service.dispatcher.probe = probe
    return times


async def submit_stream(dsn: str, per_second: float, stop: anyio.Event, ids: list[str]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        n = 0
        while not stop.is_set():
            n += 1
            cur = await conn.execute(
                "INSERT INTO jobs (job_type, payload) VALUES (%s, %s) RETURNING id",
                ("doubt" if n % 3 else "topic_short", json.dumps({"question": f"q{n}", "topic": f"t{n}"})),
            )
            row = await cur.fetchone()
            assert row
            ids.append(str(row[0]))
            with anyio.move_on_after(1 / per_second):
                await stop.wait()


async def until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.05)


async def test_sixty_second_outage_fails_nothing_and_spends_no_retry(dsn: str, db: psycopg.Connection[Any]) -> None:
    orch = OrchestratorDouble(latency_ms=20)
    await orch.start()
    port = orch.port
    ids: list[str] = []
    stop = anyio.Event()
    try:
        async with running_reactor(dsn, orch.url, dispatch=CIRCUIT) as service, anyio.create_task_group() as tg:
            probes = count_probes(service)
            tg.start_soon(submit_stream, dsn, 5.0, stop, ids)
            await until(lambda: len(ids) >= 10)
            await orch.stop()  # the render farm goes away: connection refused
            await until(lambda: service.dispatcher.circuit.state == OPEN)
            down_since = time.monotonic()
            submitted_before = len(ids)
            assert service.dispatcher.circuit.claim_budget() == 0
            # published for `reactor status` and the feed
            await wait_for(dsn, "SELECT circuit_state FROM reactor.reactors WHERE id = %s", (service.reactor_id,),
                           expect=lambda s: s == "open")
            await anyio.sleep(60)
            outage_probes = list(probes)
            submitted_during = len(ids) - submitted_before
            await orch.start(port=port)
            back_at = time.monotonic()
            await until(lambda: service.dispatcher.circuit.state == CLOSED, timeout=15)
            closed_after = time.monotonic() - back_at
            await wait_for(dsn, "SELECT circuit_state FROM reactor.reactors WHERE id = %s", (service.reactor_id,),
                           expect=lambda s: s == "closed")
            stop.set()
            await wait_for(
                dsn, "SELECT count(*) FROM jobs WHERE status <> 'completed'", expect=lambda n: n == 0, timeout=30
            )
            drained_after = time.monotonic() - back_at
    finally:
        await orch.stop()
    # the stream kept coming during the outage (5 a second for 60 s; a third of that on a loaded machine)
    assert submitted_during >= 100, submitted_during
    summary = db.execute(
        "SELECT count(*) FILTER (WHERE status = 'failed'), coalesce(sum(retry_count), 0), count(*) FROM jobs"
    ).fetchone()
    assert summary == (0, 0, len(ids))  # nothing failed, no retry spent
    moves = [(t.old, t.new) for t in service.dispatcher.circuit.transitions]
    assert moves.count((CLOSED, OPEN)) == 1
    assert moves.count((HALF_OPEN, CLOSED)) == 1
    assert moves[0] == (CLOSED, OPEN) and moves[-1] == (HALF_OPEN, CLOSED)
    # the probes kept to their backoff: each gap at least half the exponential ceiling
    gaps = [b - a for a, b in itertools.pairwise(outage_probes)]
    for n, gap in enumerate(gaps, start=1):
        assert gap >= min(5.0, 0.5 * 2**n) / 2 - 0.05, gaps
    assert len(outage_probes) <= 2 + 60 / 2.5  # bounded: about every 2.5-5 s once capped
    assert probes[0] >= down_since - 0.1
    assert closed_after < 10 and drained_after < 20


async def test_a_job_that_always_gets_500_follows_its_own_retry_rules(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    async with OrchestratorDouble() as orch, running_reactor(dsn, orch.url, dispatch=CIRCUIT) as service:
        bad = db.execute(
            "INSERT INTO jobs (job_type, payload, max_retries) VALUES "
            "('doubt', '{\"question\": \"[[status=500]] always\"}', 6) RETURNING id"
        ).fetchone()
        assert bad
        db.execute(
            "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 't' || g) "
            "FROM generate_series(1, 20) g"
        )
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (bad[0],), expect=lambda s: s == "failed")
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 20)
        assert service.dispatcher.circuit.transitions == []
        assert service.dispatcher.circuit.state == CLOSED
    row = db.execute("SELECT retry_count, error_category FROM jobs WHERE id = %s", (bad[0],)).fetchone()
    assert row == (6, "API_ERROR")


async def test_503s_for_everything_open_the_circuit_too(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with OrchestratorDouble(mix={"status:503": 1}, retry_after_s=0.1) as orch, \
            running_reactor(dsn, orch.url, dispatch=CIRCUIT) as service:
        db.execute(
            "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 't' || g) "
            "FROM generate_series(1, 12) g"
        )
        await until(lambda: service.dispatcher.circuit.state == OPEN)
        orch.configure(mix={"ok": 1})
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 12)
    assert db.execute("SELECT coalesce(sum(retry_count), 0) FROM jobs").fetchone() == (0,)


async def test_two_reactors_hold_off_during_an_outage_and_both_resume(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    two = replace(CIRCUIT, max_inflight=2, circuit_threshold=2)
    orch = OrchestratorDouble(latency_ms=50)
    await orch.start()
    port = orch.port
    try:
        async with running_reactor(dsn, orch.url, dispatch=two, reactor_id="a") as a, \
                running_reactor(dsn, orch.url, dispatch=two, reactor_id="b") as b:
            await orch.stop()
            db.execute(
                "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 't' || g) "
                "FROM generate_series(1, 30) g"
            )
            await until(lambda: a.dispatcher.circuit.state == OPEN and b.dispatcher.circuit.state == OPEN)
            # a claim already on its way when a circuit opened may still land (and be put back for
            # free): let those settle, then watch
            await until(lambda: not a.dispatcher.inflight and not b.dispatcher.inflight)
            await anyio.sleep(0.5)
            opened = db.execute("SELECT max(seq) FROM job_events").fetchone()
            assert opened
            await anyio.sleep(3)
            started_while_open = db.execute(
                "SELECT count(*) FROM job_events WHERE kind = 'started' AND seq > %s", (opened[0],)
            ).fetchone()
            # neither dispatches while open: the probes fail, so no trial starts either
            assert started_while_open == (0,)
            assert db.execute("SELECT count(*) FROM jobs WHERE status = 'processing'").fetchone() == (0,)
            await orch.start(port=port)
            # each probes on its own schedule and lets a trial through once its probe answers
            await until(lambda: OPEN not in (a.dispatcher.circuit.state, b.dispatcher.circuit.state))
            db.execute(
                "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 't' || g) "
                "FROM generate_series(31, 60) g"
            )
            await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 60)
            assert a.dispatcher.circuit.state == CLOSED and b.dispatcher.circuit.state == CLOSED
        after = {
            r[0] for r in db.execute(
                "SELECT DISTINCT actor FROM job_events WHERE kind = 'completed' AND seq > %s", (opened[0],))
        }
    finally:
        await orch.stop()
    assert after == {"reactor:a", "reactor:b"}
    assert db.execute("SELECT count(*) FILTER (WHERE status = 'failed'), sum(retry_count) FROM jobs").fetchone() == (
        0, 0)

