"""The jobs this reactor renders, and their leases: renewed while rendering, checked after a change.

A job in processing carries a lease (``lease_s``); :class:`Leases` renews the leases of every render
in flight every ``renew_every_s``, and after a reconnect or a notification that one of them changed
(cancelled, rescued by a sweep) asks which are still ours. A render whose job is no longer ours
(another attempt holds it, or it was cancelled) is aborted; its late outcome would be discarded
anyway, since every outcome is lease-checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

import anyio

from reactor.core.errors import DatabaseUnavailable
from reactor.core.models import ClaimedJob

__all__ = ["Held", "LeaseStore", "Leases"]

logger = logging.getLogger(__name__)


@dataclass
class Held:
    """A render in flight: its job, the scope that cancels it, when it started, and why it ended early."""

    job: ClaimedJob
    scope: anyio.CancelScope
    started: float
    reason: str | None = None  # why it was cancelled: cancelled | lost | drain


class LeaseStore(Protocol):
    async def renew(self, held: dict[UUID, int], lease_s: float) -> set[UUID]: ...
    async def still_held(self, held: dict[UUID, int]) -> set[UUID]: ...


class Leases:
    """Renews and checks the leases of ``inflight`` (the dispatcher's renders, by job id)."""

    def __init__(self, store: LeaseStore, inflight: dict[UUID, Held], abort: Callable[[Held, str], None],
                 *, lease_s: float, renew_every_s: float) -> None:
        self.store = store
        self.inflight = inflight
        self.abort = abort
        self.lease_s = lease_s
        self.renew_every_s = renew_every_s

    def held(self) -> dict[UUID, int]:
        """Job id -> the attempt we render."""
        return {i: e.job.attempt for i, e in self.inflight.items()}

    async def run(self) -> None:
        """Renew every ``renew_every_s`` until cancelled."""
        while True:
            await anyio.sleep(self.renew_every_s)
            held = self.held()
            if not held:
                continue
            try:
                kept = await self.store.renew(held, self.lease_s)
            except DatabaseUnavailable as exc:
                logger.warning("cannot renew leases: %s", exc)
                continue
            except Exception:
                logger.exception("cannot renew leases")
                continue
            self.drop_lost(held, kept)

    async def reconcile(self) -> None:
        """Abort the renders whose job is no longer ours."""
        held = self.held()
        if not held:
            return
        try:
            kept = await self.store.still_held(held)
        except DatabaseUnavailable as exc:
            logger.warning("cannot check held jobs: %s", exc)
            return
        except Exception:
            logger.exception("cannot check held jobs")
            return
        self.drop_lost(held, kept)

    def drop_lost(self, held: dict[UUID, int], kept: set[UUID]) -> None:
        for job_id in held.keys() - kept:
            entry = self.inflight.get(job_id)
            if entry is not None and entry.job.attempt == held[job_id]:
                logger.warning(
                    "job no longer ours (cancelled or rescued); aborting its render",
                    extra={"job_id": str(job_id), "attempt": entry.job.attempt},
                )
                self.abort(entry, "lost")
