"""Three reactors fire one schedule (the fast variant of the acceptance run in
tests/chaos/test_schedules.py): in-process reactors whose schedulers read an accelerated clock (one
real second is a simulated minute), one of them stopped and started again halfway. Each slot of
`* * * * *` makes exactly one job, and it completes."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import FAST_DISPATCH, running_service, wait_for

pytestmark = pytest.mark.anyio


async def test_three_reactors_make_one_job_per_slot_on_an_accelerated_clock(
    dsn: str, db: psycopg.Connection[Any],
) -> None:
    row = db.execute("INSERT INTO job_schedules (name, cron, job_type, payload) "
                     "VALUES ('every', '* * * * *', 'daily_ca', '{\"date\": \"{{date}}\"}') "
                     "RETURNING next_run_at, now()").fetchone()
    assert row is not None
    first, db_start = row
    t0 = time.monotonic()

    def clock() -> datetime:
        now: datetime = db_start + timedelta(minutes=time.monotonic() - t0)  # a minute a second
        return now

    def reactor(rid: str, orch_url: str) -> Service:
        settings = ServiceSettings(dsn=dsn, orchestrator_url=orch_url, dispatch=FAST_DISPATCH,
                                   handle_signals=False, schedule_max_sleep_s=0.1)
        svc = Service(replace(settings, reactor_id=rid))
        svc.scheduler.clock = clock
        return svc

    async with OrchestratorDouble() as orch:
        async with AsyncExitStack() as stack:
            for rid in ("a", "b"):
                await stack.enter_async_context(running_service(reactor(rid, orch.url)))
            async with running_service(reactor("c", orch.url)):
                await anyio.sleep(2.5)
            await anyio.sleep(1.0)
            async with running_service(reactor("c", orch.url)):
                await anyio.sleep(2.5)
        end = clock()
        slots = []
        slot = first
        while slot <= end - timedelta(seconds=5):  # the last slot may have been reached by nobody yet
            slots.append(slot)
            slot += timedelta(minutes=1)
        assert len(slots) >= 5
        keys = [r[0] for r in db.execute(
            "SELECT idempotency_key FROM jobs WHERE schedule_name = 'every' ORDER BY idempotency_key")]
        expected = [f"schedule:every:{s.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}" for s in slots]
        assert keys[:len(expected)] == expected
        assert len(keys) <= len(expected) + 1
        makers = {r[0] for r in db.execute(
            "SELECT DISTINCT actor FROM job_events e JOIN jobs j ON j.id = e.job_id "
            "WHERE e.kind = 'inserted' AND j.schedule_name = 'every'")}
        assert makers <= {"reactor:a:schedules", "reactor:b:schedules", "reactor:c:schedules"}
        # and they run: one reactor is enough
        async with running_service(reactor("d", orch.url)):
            await wait_for(dsn, "SELECT count(*) FROM jobs WHERE schedule_name = 'every' AND status <> 'completed'",
                           expect=lambda n: n == 0)
