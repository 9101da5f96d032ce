"""Claim under limits, render, write the outcome back: the reactor's work loop.

The dispatcher sleeps until something can change what it may start: a notification (a job became
queued, a job left processing, a limit changed), its own timer for the next delayed retry, or a
resync after the listener reconnected. Then it claims as many jobs as the fleet-wide limits and its
own ``max_inflight`` allow, in one statement, and renders each in its own task. Outcomes are
written back in batches by one writer task, each checked against the lease, so an attempt whose
job was taken over (lease expired) or cancelled cannot overwrite anything.

It imports neither the HTTP client nor the feed: the render call is injected. Its decisions are pure
functions (reactor/engine/decisions.py); leases are kept by reactor/engine/leases.py, the circuit
breaker's probes and state by reactor/engine/circuit_watch.py.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import anyio
from anyio.abc import TaskGroup, TaskStatus

from reactor.core.backoff import Backoff, backoff
from reactor.core.circuit import HALF_OPEN, CircuitBreaker, Transition
from reactor.core.errors import DatabaseUnavailable, StatementRefused
from reactor.core.models import ClaimedJob, Outcome
from reactor.core.notice import Notice
from reactor.engine.attempt import PARKED, CacheFn, RenderFn, attempt
from reactor.engine.circuit_watch import CircuitWatch, ProbeFn
from reactor.engine.decisions import DispatchSettings, claim_room, notice_reaction
from reactor.engine.leases import Held, Leases

__all__ = ["DispatchSettings", "DispatchStats", "Dispatcher", "JobStore", "RenderFn"]

logger = logging.getLogger(__name__)


class JobStore(Protocol):
    """What the dispatcher needs from the database (reactor.db.store.Database provides it)."""

    reactor_id: str

    async def finish_and_claim(
        self, outcomes: list[Outcome], max_jobs: int, lease_s: float, clock: datetime
    ) -> tuple[set[UUID], list[ClaimedJob]]: ...
    async def renew(self, held: dict[UUID, int], lease_s: float) -> set[UUID]: ...
    async def still_held(self, held: dict[UUID, int]) -> set[UUID]: ...
    async def next_wakeups(self) -> dict[str, Any]: ...
    async def release_strays(self, known: set[UUID], free_requeues: int, reason: str) -> list[dict[str, Any]]: ...
    async def set_circuit(self, state: str, since: datetime | None) -> None: ...


@dataclass
class DispatchStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    discarded: int = 0
    cache_hits: int = 0  # completed from the render cache, no render call
    parked: int = 0  # waiting for an identical render of another job
    by_category: dict[str, int] = field(default_factory=dict)
    #: round trips that asked for jobs, and those of them that came back with none
    claims: int = 0
    claims_empty: int = 0
    #: notifications from others that asked for a claim
    claim_wakeups: int = 0


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        render: RenderFn,
        settings: DispatchSettings | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        on_outcome: Callable[[ClaimedJob, Outcome], None] | None = None,
        probe: ProbeFn | None = None,
        cache: CacheFn | None = None,
    ) -> None:
        self.store = store
        self.render = render
        self.cache = cache  # the render cache, asked before each render (None: none)
        self.settings = settings or DispatchSettings()
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_outcome = on_outcome
        #: called after each round trip that wrote or claimed something (committed): its notice may
        #: go on reactor_log, which this reactor's listener does not always follow
        self.on_cycle: Callable[[], None] = lambda: None
        self.actor = f"reactor:{store.reactor_id}"
        self.circuit = CircuitBreaker(
            threshold=self.settings.circuit_threshold, probe_base_s=self.settings.probe_base_s,
            probe_cap_s=self.settings.probe_cap_s, rng=self.rng,
        )
        self.inflight: dict[UUID, Held] = {}
        self._circuit = CircuitWatch(self.circuit, store, probe, inflight=lambda: len(self.inflight),
                                     want_claim=self._want_claim)
        self._leases = Leases(store, self.inflight, self._abort, lease_s=self.settings.lease_s,
                              renew_every_s=self.settings.renew_every_s)
        self.stats = DispatchStats()
        self.claiming = True  # False while draining
        self._wake = anyio.Event()
        self._next_due: float | None = None  # monotonic time of the next delayed retry we know of
        self._due_dirty = True
        self._check_lost = False
        #: max_concurrent_renders = 0, as last read (with the next due time, after every config
        #: change, reconnect and sweep): while paused, a new job costs no claim query
        self.paused = False
        self._claim_wanted = True  # something may be claimable (cleared when a claim comes back short)
        self._want_gen = 0  # bumped by every reason to claim, so one arriving mid-claim is not lost
        self._outbox: list[Outcome] = []  # outcomes waiting to be written
        self._exchanging = False  # a round trip (outcomes, a claim) is on its way
        self._idle = anyio.Event()
        self._tg: TaskGroup | None = None
        self._refusals = 0  # claims refused in a row by the database (not an outage)
        self._stopped = anyio.Event()  # set when claiming stops (drain, abort)
        self._runs = 0  # how often run() started (more than once: restarted after a failure)

    @property
    def probe(self) -> ProbeFn | None:
        """``GET /health`` of the orchestrator, tried while the circuit is open."""
        return self._circuit.probe

    @probe.setter
    def probe(self, probe: ProbeFn | None) -> None:
        self._circuit.probe = probe

    @property
    def on_transition(self) -> Callable[[Transition], None] | None:
        """Called with each transition of the circuit."""
        return self._circuit.on_transition

    @on_transition.setter
    def on_transition(self, hook: Callable[[Transition], None] | None) -> None:
        self._circuit.on_transition = hook

    # -- wake-ups ---------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def on_connect(self) -> None:
        """The listener (re)connected: anything may have happened meanwhile."""
        self._due_dirty = True
        self._check_lost = True
        self._want_claim()

    def want_claim(self) -> None:
        """Something may be claimable now (the sweep put jobs back, say)."""
        self._due_dirty = True
        self._want_claim()

    def limits_seen(self, paused: bool) -> None:
        """The limits as read from the database (here, or by the sweep)."""
        if self.paused and not paused:
            self._want_claim()  # resumed: whatever queued meanwhile is ours to claim
        self.paused = paused

    def _want_claim(self) -> None:
        self._claim_wanted = True
        self._want_gen += 1
        self.wake()

    def on_notice(self, notice: Notice) -> None:
        react = notice_reaction(notice, self.actor, self.inflight.keys())
        if react.check_lost:
            self._check_lost = True
            self.wake()
        if react.due_dirty:
            self._due_dirty = True
            self.wake()  # it may be sooner than the due time we sleep until
        if react.claim:
            self.stats.claim_wakeups += 1
            self._want_claim()

    # -- main loop --------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Dispatch until cancelled. Run again after a failure (the service's supervisor does), it
        first puts back, at once and without spending a retry, the jobs the failed run held: their
        renders ended with it."""
        if self._runs:
            await self._release_strays([], "the reactor's dispatcher restarted while this job ran")
        self._runs += 1
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._leases.run)
            tg.start_soon(self._circuit.run)
            task_status.started()
            try:
                await self._loop()
            finally:
                tg.cancel_scope.cancel()

    async def _loop(self) -> None:
        """One round trip per turn: write the outcomes waiting, and claim what there is room for."""
        while True:
            if not self._outbox and not self._claim_wanted and not self._check_lost:
                with anyio.move_on_after(self._sleep_for()):
                    await self._wake.wait()
            if self._outbox and self.inflight and self.settings.batch_window_s > 0:
                # other renders are finishing too: let their outcomes join this round trip
                await anyio.sleep(self.settings.batch_window_s)
            self._wake = anyio.Event()
            if self._next_due is not None and self._next_due <= time.monotonic():
                self._next_due = None
                self._due_dirty = True
                self._want_claim()
            if self._check_lost:
                self._check_lost = False
                await self._leases.reconcile()
            if self._due_dirty and self.claiming:
                await self._refresh_due()
            batch, self._outbox = self._outbox, []
            room = self._room() if self._claim_wanted else 0
            if not batch and room <= 0:
                self._claim_wanted = False  # full, paused or draining: a finished job or a notice wakes us
                continue
            self._exchanging = True  # a drain waits for it: claimed jobs must not be left held
            gen = self._want_gen
            written, jobs = await self._exchange(batch, room)
            self._exchanging = False
            if jobs:
                self._refusals = 0
            if room > 0:
                self.stats.claims += 1
                self.stats.claims_empty += not jobs
            self._recorded(batch, written)
            if written or jobs:
                self.on_cycle()
            for job in jobs:
                self._start(job)
            if len(jobs) < room and gen == self._want_gen:
                self._claim_wanted = False  # limits or an empty queue stopped us: wait to be told
            self._maybe_idle()

    def _room(self) -> int:
        return claim_room(claiming=self.claiming, paused=self.paused, max_inflight=self.settings.max_inflight,
                          inflight=len(self.inflight), budget=self.circuit.claim_budget())

    def _sleep_for(self) -> float:
        if self._next_due is None:
            return math.inf
        return max(0.0, self._next_due - time.monotonic())

    async def _refresh_due(self) -> None:
        # cleared before the read, not after it: a notice that arrives while it runs (a job delayed to
        # sooner, committed after the read's snapshot) sets it again, and the next turn reads again
        self._due_dirty = False
        try:
            w = await self.store.next_wakeups()
        except DatabaseUnavailable as exc:
            self._due_dirty = True
            logger.warning("cannot read the next due time: %s", exc)
            return
        except Exception:
            self._due_dirty = True
            logger.exception("cannot read the next due time")
            return
        self.limits_seen(bool(w.get("paused")))
        due = w.get("next_due")
        if due is None:
            self._next_due = None
        else:
            delta = (due - w["db_now"]).total_seconds()
            self._next_due = time.monotonic() + max(0.0, delta) + 0.005

    async def _exchange(
        self, batch: list[Outcome], room: int, *, split: bool = True
    ) -> tuple[set[UUID], list[ClaimedJob]]:
        """finish_and_claim, retried until the database answers: outcomes are never dropped.

        A statement the database refuses (not an outage: the same one would fail again) is split:
        each outcome is written alone, so one that cannot be stored fails its own job and no other
        (``split=False`` raises :class:`StatementRefused` instead). An answer that cannot be read
        puts back whatever this reactor now holds without knowing it.
        """
        retry = Backoff(base=0.1, cap=5.0, rng=self.rng)
        while True:
            try:
                return await self.store.finish_and_claim(batch, room, self.settings.lease_s, self.clock())
            except DatabaseUnavailable as exc:
                delay = retry.delay()
                logger.warning(
                    "database unavailable (%d outcomes waiting; retry in %.1f s): %s", len(batch), delay, exc
                )
                await anyio.sleep(delay)
                room = self._room() if room else 0
            except StatementRefused as exc:
                if not split:
                    raise
                return await self._after_refusal(batch, room, exc)
            except Exception as exc:  # a bug reading the answer must not stop the reactor
                logger.exception("the answer to a claim could not be read; putting back what it took")
                reason = f"the reactor could not read this job after claiming it: {type(exc).__name__}: {exc}"
                return await self._release_strays(batch, reason), []

    async def _after_refusal(
        self, batch: list[Outcome], room: int, exc: StatementRefused
    ) -> tuple[set[UUID], list[ClaimedJob]]:
        if not batch:
            self._refusals += 1
            delay = backoff(self._refusals, base=0.5, cap=30.0, rng=self.rng)
            logger.error("the claim was refused (trying again in %.0f s): %s", delay, exc)
            with anyio.move_on_after(delay):
                await self._stopped.wait()  # a stop does not wait for it
            return set(), []
        logger.error("the database refused %d outcomes; writing them one at a time: %s", len(batch), exc)
        written: set[UUID] = set()
        for outcome in batch:
            written |= await self._write_alone(outcome)
        jobs: list[ClaimedJob] = []
        if room:
            room = self._room()
            _, jobs = await self._exchange([], room) if room > 0 else (set(), [])
        return written, jobs

    async def _write_alone(self, outcome: Outcome) -> set[UUID]:
        """One outcome on its own; one the database refuses fails its job with UNKNOWN instead."""
        try:
            return (await self._exchange([outcome], 0, split=False))[0]
        except StatementRefused as exc:
            reason = str(exc)
        logger.error("outcome refused by the database; failing the job: %s", reason,
                     extra={"job_id": str(outcome.job_id), "attempt": outcome.attempt})
        stand_in = Outcome(
            outcome.job_id, outcome.attempt, "failed", outcome.retry_count, error_category="UNKNOWN",
            error_message=f"the outcome ({outcome.status}) could not be recorded: {reason}"[:1000],
        )
        try:
            return (await self._exchange([stand_in], 0, split=False))[0]
        except StatementRefused as exc:
            logger.error("even a plain failure was refused; the sweep takes the job back when its lease "
                         "ends: %s", exc, extra={"job_id": str(outcome.job_id)})
            return set()

    async def _release_strays(self, batch: list[Outcome], reason: str) -> set[UUID]:
        """Put back the jobs we hold but do not render and have no outcome for: claimed by an answer
        we could not read, finished with an outcome in ``batch`` that it may not have written, or
        held by a run of ours that failed. Returns the outcomes of ``batch`` that were written."""
        known = set(self.inflight) | {o.job_id for o in self._outbox}
        try:
            rows = await self.store.release_strays(known, self.settings.free_requeues, reason)
        except Exception as exc:
            logger.error("cannot put back unknown jobs (the sweep will, when their lease ends): %s", exc)
            return set()
        released = {r["id"] for r in rows}
        if released:
            self._want_claim()  # they are queued again; our own NOTIFY does not wake us
        for r in rows:
            logger.warning("job put back: the claim that took it could not be read",
                           extra={"job_id": str(r["id"]), "status": r["status"]})
        return {o.job_id for o in batch} - released

    def _start(self, job: ClaimedJob) -> None:
        assert self._tg is not None
        self.stats.claimed += 1
        self.circuit.trial_started()
        stale = self.inflight.get(job.id)
        if stale is not None:
            # we hold an older attempt of this job (its claim was undone meanwhile): it is not ours
            self._abort(stale, "lost")
        entry = Held(job, anyio.CancelScope(), time.monotonic())
        self.inflight[job.id] = entry
        logger.info(
            "job started",
            extra={"job_id": str(job.id), "attempt": job.attempt, "job_type": job.job_type,
                   "priority": job.priority},
        )
        self._tg.start_soon(self._run_job, entry)

    # -- one job ----------------------------------------------------------------------------------

    async def _run_job(self, entry: Held) -> None:
        job = entry.job
        outcome: Outcome | None = None
        try:
            with entry.scope:
                try:
                    outcome = await attempt(job, self.render, self.settings, self.circuit, self._circuit, self.rng,
                                            self.cache)
                except Exception as exc:  # whatever went wrong with this job stays with this job
                    logger.exception("job %s failed unexpectedly", job.id)
                    outcome = Outcome(
                        job.id, job.attempt, "failed", job.retry_count, error_category="UNKNOWN",
                        error_message=f"the reactor failed on this job: {exc!r}"[:500],
                    )
            if outcome is not None and outcome.status == PARKED:
                # queued again by the cache, waiting for another job's render: nothing to write
                self.stats.parked += 1
                self._due_dirty = True  # it is due again if nothing settles it
                logger.info("job waits for an identical render", extra={"job_id": str(job.id), "attempt": job.attempt})
                outcome = None
            elif outcome is None and entry.reason == "drain":
                outcome = Outcome(
                    job.id, job.attempt, "queued", job.retry_count,
                    error_message=f"returned to the queue: reactor {self.store.reactor_id} stopped",
                )
                self.stats.released += 1
            elif outcome is None:
                self.stats.discarded += 1
                logger.info(
                    "job abandoned",
                    extra={"job_id": str(job.id), "attempt": job.attempt, "reason": entry.reason},
                )
        finally:
            if self.inflight.get(job.id) is entry:
                del self.inflight[job.id]
            if self.circuit.state == HALF_OPEN:
                self.circuit.trial_in_flight = False  # the trial ended without deciding: allow another
            if outcome is not None:
                self._outbox.append(outcome)
            self._maybe_idle()
            self._want_claim()  # room was freed

    def _abort(self, entry: Held, reason: str) -> None:
        if entry.reason is None:
            entry.reason = reason
        entry.scope.cancel()

    # -- writing outcomes -------------------------------------------------------------------------

    def _recorded(self, batch: list[Outcome], written: set[UUID]) -> None:
        for o in batch:
            if o.job_id not in written:
                self.stats.discarded += 1
                logger.warning(
                    "outcome discarded: the lease was lost (job rescued or changed meanwhile)",
                    extra={"job_id": str(o.job_id), "attempt": o.attempt, "status": o.status},
                )
                continue
            self._count(o)
            if o.status == "queued" and o.delay_seconds > 0:
                due = time.monotonic() + o.delay_seconds
                if self._next_due is None or due < self._next_due:
                    self._next_due = due

    def _count(self, o: Outcome) -> None:
        extra = {"job_id": str(o.job_id), "attempt": o.attempt}
        if o.error_category:
            self.stats.by_category[o.error_category] = self.stats.by_category.get(o.error_category, 0) + 1
            extra["category"] = o.error_category
        if o.status == "completed":
            self.stats.completed += 1
            if o.result is not None and "cached_from" in o.result:
                self.stats.cache_hits += 1
            logger.info("job completed", extra=extra)
        elif o.status == "failed":
            self.stats.failed += 1
            logger.warning("job failed: %s", o.error_message, extra=extra)
        elif o.error_category:
            self.stats.retried += 1
            extra["retry_in_s"] = round(o.delay_seconds, 2)
            logger.info("job will be retried: %s", o.error_message, extra=extra)
        else:
            logger.info("job returned to the queue", extra=extra)

    # -- stopping ---------------------------------------------------------------------------------

    def _maybe_idle(self) -> None:
        if not self.inflight and not self._outbox and not self._exchanging:
            self._idle.set()

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop claiming; let renders finish within the grace, then abort and release the rest."""
        self.claiming = False
        self._stopped.set()
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        self._idle = anyio.Event()
        self._maybe_idle()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        if self.inflight:
            logger.warning("grace period over: returning %d jobs to the queue", len(self.inflight))
            for entry in list(self.inflight.values()):
                self._abort(entry, "drain")
        self._idle = anyio.Event()
        self._maybe_idle()
        with anyio.move_on_after(10):
            await self._idle.wait()

    def abort_all(self) -> None:
        """Second signal: abort every render now and release the jobs (best effort)."""
        self.claiming = False
        self._stopped.set()
        for entry in list(self.inflight.values()):
            self._abort(entry, "drain")

