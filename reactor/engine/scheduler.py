"""The scheduler: makes the jobs of periodic schedules (``job_schedules``, migration 0011) when due.

It sleeps until the earliest ``next_run_at`` of any enabled schedule (as the database's clock
says), and is woken early by ``NOTIFY reactor_schedules`` (a schedule added or changed) and by every
reconnect of the listener. The firing itself is one SQL function, ``reactor.fire_schedules()``: any
number of reactors may call it at once, and each slot still makes exactly one job, so every reactor
runs a scheduler and none is elected. Past ``max_sleep_s`` it looks again anyway (a safety net for a
notification lost in a reconnect; a look finds nothing due and costs one short transaction).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from reactor.core.errors import DatabaseUnavailable
from reactor.core.notice import Notice

__all__ = ["ScheduleStore", "Scheduler"]

logger = logging.getLogger(__name__)


class ScheduleStore(Protocol):
    async def fire_schedules(self, now: datetime | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]: ...


class Scheduler:
    """Fires due schedule slots (run :meth:`run` in the service's task group)."""

    def __init__(
        self,
        store: ScheduleStore,
        *,
        max_sleep_s: float = 300.0,
        clock: Callable[[], datetime | None] = lambda: None,
        fired: Callable[[str], None] = lambda schedule: None,
    ) -> None:
        self.store = store
        self.max_sleep_s = max_sleep_s
        #: the time to fire at: None is the database's clock (tests inject one)
        self.clock = clock
        self._fired = fired  # one job made by this reactor for that schedule (for the metrics)
        self._wake = anyio.Event()
        self.jobs_made = 0

    def wake(self) -> None:
        """Look again now (a schedule changed, the listener reconnected)."""
        self._wake.set()

    def on_notice(self, notice: Notice) -> None:
        if notice.channel == "reactor_schedules":
            self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            # replaced before the look, so that a change committed meanwhile still wakes us
            self._wake = anyio.Event()
            sleep_s = self.max_sleep_s
            now = self.clock()
            try:
                fired, nxt = await self.store.fire_schedules(now)
            except DatabaseUnavailable as exc:
                logger.warning("cannot fire schedules: %s", exc)
                fired, nxt = [], {}
                sleep_s = min(5.0, self.max_sleep_s)
            for row in fired:
                if row["fired"]:
                    self.jobs_made += 1
                    self._fired(str(row["schedule_name"]))
                    logger.info("schedule fired", extra={"schedule": row["schedule_name"],
                                                         "slot": row["slot"], "job_id": str(row["job_id"])})
                else:
                    logger.info("schedule slot skipped", extra={"schedule": row["schedule_name"],
                                                                "slot": row["slot"]})
            next_run = nxt.get("next_run_at")
            if next_run is not None:
                # a little past the slot: the database's clock, not ours, must say it is due
                # (catch_up = all may leave slots due for the next call: then at once)
                sleep_s = min(sleep_s, max(0.0, (next_run - (now or nxt["db_now"])).total_seconds() + 0.01))
            deadline = time.monotonic() + sleep_s
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                await self._wake.wait()
