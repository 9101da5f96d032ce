"""The sweeper: takes back what died, and says this reactor is alive.

Every ``every_s`` (30 s), and right after the earliest lease in the database would expire, one
transaction (reactor/db/store.py ``Database.sweep``) puts back jobs whose lease expired (their
reactor died), jobs in processing with no lease (set by hand) and jobs processing longer than
``job_timeout_minutes`` + ``grace_s``; prunes old events; beats this reactor's heartbeat; and reads
when to look next; then deletes finished jobs past ``job_retention`` in a few short batches.
While no lease is held anywhere it sleeps the full period, until a notification
says work started somewhere (:meth:`Sweeper.on_notice`); sweeps start at least ``min_gap_s`` apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from reactor.core.errors import DatabaseUnavailable
from reactor.core.notice import Notice

__all__ = ["SweepStore", "Sweeper"]

logger = logging.getLogger(__name__)


class SweepStore(Protocol):
    async def sweep(self, grace_s: float, orphan_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]: ...


class Sweeper:
    """Runs the sweep (run :meth:`run` in the service's task group)."""

    def __init__(
        self,
        store: SweepStore,
        *,
        every_s: float,
        min_gap_s: float,
        grace_s: float,
        orphan_s: float,
        limits_seen: Callable[[bool], None] = lambda paused: None,
        want_claim: Callable[[], None] = lambda: None,
        recovered: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.store = store
        self.every_s = every_s
        self.min_gap_s = min_gap_s
        self.grace_s = grace_s
        self.orphan_s = orphan_s
        self._limits_seen = limits_seen  # whether dispatch is paused, as the sweep read it
        self._want_claim = want_claim  # jobs were put back: the dispatcher may claim them
        self._recovered = recovered  # one job taken back, and why (for the metrics)
        self._wake = anyio.Event()
        #: a lease was held somewhere at the last sweep (else the sweep waits to hear of work)
        self.knows_leases = False
        self.swept_total = 0

    def wake(self) -> None:
        """Sweep soon (at least ``min_gap_s`` after the last one began)."""
        self._wake.set()

    def on_notice(self, notice: Notice) -> None:
        if not self.knows_leases and notice.channel == "reactor_events" and (
                notice.kind == "started" or notice.n > 1):
            # the sweep slept with no lease to watch; work started somewhere: learn its lease
            self.knows_leases = True
            self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Every ``every_s``, and when a lease is due to expire: take back what died."""
        task_status.started()
        while True:
            started = time.monotonic()
            next_at = started + self.every_s
            # a wake-up that arrives while this sweep runs (work started after its snapshot) must
            # not be lost: the event is replaced before the sweep, not after it
            self._wake = anyio.Event()
            try:
                swept, wakeups = await self.store.sweep(self.grace_s, self.orphan_s)
            except DatabaseUnavailable as exc:
                logger.warning("sweep failed: %s", exc)
                swept, wakeups = [], {}
                next_at = time.monotonic() + min(5.0, self.every_s)
            if "paused" in wakeups:
                self._limits_seen(bool(wakeups["paused"]))  # a safety net for a lost notice
            if swept:
                self._want_claim()
            for row in swept:
                self.swept_total += 1
                self._recovered(str(row["reason"]))
                logger.warning(
                    "job taken back by the sweep",
                    extra={"job_id": str(row["id"]), "status": row["status"], "reason": row["reason"],
                           "held_by": row["held_by"], "category": "TIMEOUT"},
                )
            if wakeups.get("jobs_pruned"):
                logger.info("finished jobs past their retention deleted", extra={"jobs": wakeups["jobs_pruned"]})
            expiry = wakeups.get("next_lease_expiry")
            if not self._wake.is_set():  # else: woken meanwhile, and this answer may be stale
                self.knows_leases = expiry is not None
            if expiry is not None:
                # a lease held by anyone (maybe a dead reactor) expires then: look right after
                delta = (expiry - wakeups["db_now"]).total_seconds() + 0.5
                next_at = min(next_at, time.monotonic() + max(1.0, delta))
            with anyio.move_on_after(max(0.0, next_at - time.monotonic())):
                await self._wake.wait()
            # woken early (work started somewhere, the listener reconnected): a lease lasts lease_s,
            # so learning of it within sweep_min_gap_s is soon enough. Sooner, each claim made while
            # no lease was held woke a sweep (about a hundred a second at 100 jobs/s), and under a
            # pinned MVCC horizon each sweep walks every job that went through processing since
            await anyio.sleep(max(0.0, started + min(self.min_gap_s, self.every_s) - time.monotonic()))

