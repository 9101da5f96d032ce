"""The scheduler's loop against a fake store: it sleeps until the next slot as the database says,
is woken by NOTIFY reactor_schedules, and rides out a database outage."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from reactor.core.errors import DatabaseUnavailable
from reactor.core.notice import parse_notice
from reactor.engine.scheduler import Scheduler

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeStore:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[float] = []

    async def fire_schedules(self, now: datetime | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        self.calls.append(time.monotonic())
        answer = self.answers.pop(0) if self.answers else ([], {"next_run_at": None, "db_now": NOW})
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]


async def test_sleeps_until_the_next_slot_and_counts_what_it_made() -> None:
    made: list[str] = []
    store = FakeStore([
        ([{"schedule_name": "s", "slot": NOW, "job_id": "j", "fired": True},
          {"schedule_name": "t", "slot": NOW, "job_id": None, "fired": False}],
         {"next_run_at": NOW + timedelta(seconds=0.3), "db_now": NOW}),
    ])
    sched = Scheduler(store, max_sleep_s=60, fired=made.append)
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        await anyio.sleep(0.15)
        assert len(store.calls) == 1
        await anyio.sleep(0.4)
        assert len(store.calls) == 2  # woke at the slot (0.31 s), then sleeps: nothing is scheduled
        assert store.calls[1] - store.calls[0] == pytest.approx(0.31, abs=0.1)
        tg.cancel_scope.cancel()
    assert made == ["s"] and sched.jobs_made == 1


async def test_a_schedule_change_wakes_it_and_other_channels_do_not() -> None:
    store = FakeStore([])
    sched = Scheduler(store, max_sleep_s=60)
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        await anyio.sleep(0.05)
        sched.on_notice(parse_notice("reactor_events", '{"n": 1}'))
        await anyio.sleep(0.05)
        assert len(store.calls) == 1
        sched.on_notice(parse_notice("reactor_schedules", "{}"))
        await anyio.sleep(0.05)
        assert len(store.calls) == 2
        tg.cancel_scope.cancel()


async def test_an_outage_is_retried_soon() -> None:
    store = FakeStore([DatabaseUnavailable("gone")])
    sched = Scheduler(store, max_sleep_s=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        await anyio.sleep(0.35)
        assert len(store.calls) == 2
        tg.cancel_scope.cancel()
