"""Claim under limits, render, write the outcome back: the reactor's work loop.

The dispatcher sleeps until something can change what it may start: a notification (a job became
queued, a job left processing, a limit changed), its own timer for the next delayed retry, or a
resync after the listener reconnected. Then it claims as many jobs as the fleet-wide limits and its
own ``max_inflight`` allow, in one statement, and renders each in its own task. Outcomes are
written back in batches by one writer task, each checked against the lease, so an attempt whose
job was taken over (lease expired) or cancelled cannot overwrite anything.

It imports neither the HTTP client nor the feed: the render call is injected.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import anyio
from anyio.abc import TaskGroup, TaskStatus

from reactor.core.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Transition
from reactor.core.errors import RenderError, StatementRefused
from reactor.core.models import ClaimedJob, Outcome, RenderRequest, RenderResult
from reactor.core.notice import Notice
from reactor.core.policy import InvalidPayload, build_request, decide_failure
from reactor.db.store import TRANSIENT_ERRORS

__all__ = ["DispatchSettings", "Dispatcher", "JobStore", "Reaction", "RenderFn", "notice_reaction"]

logger = logging.getLogger(__name__)

RenderFn = Callable[[RenderRequest, float], Awaitable[RenderResult]]
ProbeFn = Callable[[], Awaitable[bool]]

#: answers that mean "the render farm is down or overloaded", not "this job is bad"
OUTAGE_STATUSES = frozenset({502, 503})


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


@dataclass(frozen=True)
class DispatchSettings:
    max_inflight: int = 32
    lease_s: float = 15.0
    renew_every_s: float = 5.0
    drain_grace_s: float = 30.0
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 300.0
    #: the render deadline is job_timeout_minutes; this caps it (tests use seconds)
    max_render_timeout_s: float | None = None
    #: consecutive outage failures (refused, reset, connect timeout, 502, 503) that open the circuit
    circuit_threshold: int = 5
    probe_base_s: float = 1.0
    probe_cap_s: float = 30.0
    #: attempts a job may be put back without spending a retry (outages, stops) before its own
    #: retry rules apply again: a job that breaks the connection every time cannot loop forever
    free_requeues: int = 10
    #: while renders are in flight, an outcome waits this long for others to share its round trip.
    #: Off by default: outcomes that arrive while a round trip is in flight share the next one anyway,
    #: and a window only adds latency (bench/reactor_bench.py throughput, three runs each: 2 ms 795-827
    #: jobs/s, none 873-1083)
    batch_window_s: float = 0.0


@dataclass(frozen=True)
class Reaction:
    """What a notification asks of the dispatcher."""

    claim: bool = False  # something may be claimable now
    due_dirty: bool = False  # re-read the next due time (and whether dispatch is paused)
    check_lost: bool = False  # a job we render may have been taken from us: check which we still hold


def notice_reaction(notice: Notice, actor: str, inflight: Collection[UUID]) -> Reaction:
    """The dispatcher's reaction to a notification: a pure function of it, our actor and the jobs
    we render (``reactor_events`` and ``reactor_config``; the other channels are the feed's)."""
    if notice.channel == "reactor_config":
        return Reaction(claim=True, due_dirty=True)  # limits changed (paused?): re-read with the due time
    if notice.channel != "reactor_events":
        return Reaction()
    if notice.truncated:
        return Reaction(claim=True)
    if notice.actor == actor:
        return Reaction()  # our own claim or outcome: already accounted for
    if notice.n == 1:
        return Reaction(
            # a job we render was changed by someone else (cancelled, rescued): check which attempt
            # holds it now, and abort ours if it is no longer ours
            check_lost=notice.job_id in inflight and notice.old_status == "processing",
            due_dirty=notice.kind == "retrying",
            claim=notice.status == "queued" or notice.old_status == "processing",
        )
    return Reaction(
        check_lost=notice.cancelled > 0 and len(inflight) > 0,
        due_dirty=notice.queued > 0,
        claim=notice.queued > 0 or notice.finished > 0,
    )


@dataclass
class _Inflight:
    job: ClaimedJob
    scope: anyio.CancelScope
    started: float
    reason: str | None = None  # why it was cancelled: cancelled | lost | drain


@dataclass
class DispatchStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    discarded: int = 0
    by_category: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.store = store
        self.render = render
        self.settings = settings or DispatchSettings()
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_outcome = on_outcome
        self.actor = f"reactor:{store.reactor_id}"
        self.probe = probe
        self.circuit = CircuitBreaker(
            threshold=self.settings.circuit_threshold, probe_base_s=self.settings.probe_base_s,
            probe_cap_s=self.settings.probe_cap_s, rng=self.rng,
        )
        self.on_transition: Callable[[Transition], None] | None = None
        self._circuit_wake = anyio.Event()
        self._circuit_since: datetime | None = None
        self._circuit_published: tuple[str, datetime | None] | None = None
        self.stats = DispatchStats()
        self.inflight: dict[UUID, _Inflight] = {}
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
        if react.claim:
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
            tg.start_soon(self._lease_loop)
            tg.start_soon(self._circuit_loop)
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
                await self._reconcile()
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
            self._recorded(batch, written)
            for job in jobs:
                self._start(job)
            if len(jobs) < room and gen == self._want_gen:
                self._claim_wanted = False  # limits or an empty queue stopped us: wait to be told
            self._maybe_idle()

    def _room(self) -> int:
        if not self.claiming or self.paused:
            return 0
        room = max(0, self.settings.max_inflight - len(self.inflight))
        budget = self.circuit.claim_budget()
        return room if budget is None else min(room, budget)

    def _sleep_for(self) -> float:
        if self._next_due is None:
            return math.inf
        return max(0.0, self._next_due - time.monotonic())

    async def _refresh_due(self) -> None:
        try:
            w = await self.store.next_wakeups()
        except TRANSIENT_ERRORS as exc:
            logger.warning("cannot read the next due time: %s", exc)
            return
        except Exception:
            logger.exception("cannot read the next due time")
            return
        self._due_dirty = False
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
        delay = 0.1
        while True:
            try:
                return await self.store.finish_and_claim(batch, room, self.settings.lease_s, self.clock())
            except TRANSIENT_ERRORS as exc:
                logger.warning(
                    "database unavailable (%d outcomes waiting; retry in %.1f s): %s", len(batch), delay, exc
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
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
            delay = min(30.0, 0.5 * 2 ** min(self._refusals, 10))
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
        entry = _Inflight(job, anyio.CancelScope(), time.monotonic())
        self.inflight[job.id] = entry
        logger.info(
            "job started",
            extra={"job_id": str(job.id), "attempt": job.attempt, "job_type": job.job_type,
                   "priority": job.priority},
        )
        self._tg.start_soon(self._run_job, entry)

    # -- one job ----------------------------------------------------------------------------------

    async def _run_job(self, entry: _Inflight) -> None:
        job = entry.job
        outcome: Outcome | None = None
        try:
            with entry.scope:
                try:
                    outcome = await self._attempt(job)
                except Exception as exc:  # whatever went wrong with this job stays with this job
                    logger.exception("job %s failed unexpectedly", job.id)
                    outcome = Outcome(
                        job.id, job.attempt, "failed", job.retry_count, error_category="UNKNOWN",
                        error_message=f"the reactor failed on this job: {exc!r}"[:500],
                    )
            if outcome is None and entry.reason == "drain":
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

    async def _attempt(self, job: ClaimedJob) -> Outcome:
        try:
            request = build_request(job)
        except InvalidPayload as exc:
            return self._failure(job, RenderError("INVALID_INPUT", str(exc)))
        except Exception as exc:  # a bug here must fail this job alone
            logger.exception("the request for job %s could not be built", job.id)
            return self._failure(job, RenderError("INVALID_INPUT", f"the request could not be built: {exc!r}"[:500]))
        timeout = job.timeout_minutes * 60.0
        if self.settings.max_render_timeout_s is not None:
            timeout = min(timeout, self.settings.max_render_timeout_s)
        try:
            result = await self.render(request, timeout)
        except RenderError as exc:
            if exc.transport or exc.status_code in OUTAGE_STATUSES:
                self._transition(self.circuit.on_outage_failure(time.monotonic()))
                if job.attempt - 1 - job.retry_count < self.settings.free_requeues:
                    return self._outage_requeue(job, exc)
            elif exc.status_code is not None or exc.category == "UNKNOWN":
                # the orchestrator answered: whatever is wrong is about this job, not the farm
                self._transition(self.circuit.on_success(time.monotonic()))
            return self._failure(job, exc)
        except Exception as exc:  # a bug or an unexpected library error must not stop the reactor
            logger.exception("render of job %s failed unexpectedly", job.id)
            return self._failure(job, RenderError("UNKNOWN", f"unexpected error: {exc!r}"[:500]))
        self._transition(self.circuit.on_success(time.monotonic()))
        return Outcome(job.id, job.attempt, "completed", job.retry_count, result=result.to_json())

    def _outage_requeue(self, job: ClaimedJob, err: RenderError) -> Outcome:
        """Back to the queue without spending a retry: the render farm failed, not the job."""
        delay = 0.0 if self.circuit.is_outage() else min(
            self.settings.backoff_cap_s, self.settings.backoff_base_s * (1 + self.rng.random()))
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)  # the orchestrator asked for it
        details: dict[str, Any] = {
            "at": datetime.now(UTC).isoformat(), "attempt": job.attempt, "outage": True,
            "circuit": self.circuit.state,
        }
        if err.status_code is not None:
            details["status_code"] = err.status_code
        if err.body is not None:
            details["body"] = err.body
        return Outcome(
            job.id, job.attempt, "queued", job.retry_count, delay_seconds=delay,
            error_category=err.category,
            error_message=f"{err.message} (render farm unreachable: put back without spending a retry)",
            error_details=details,
        )

    # -- circuit breaker ----------------------------------------------------------------------------

    def _transition(self, t: Transition | None) -> None:
        if t is None:
            return
        level = logging.INFO if t.new == CLOSED else logging.WARNING
        logger.log(level, "circuit %s -> %s: %s", t.old, t.new, t.reason,
                   extra={"circuit": t.new, "inflight": len(self.inflight)})
        if t.new == OPEN and t.old == CLOSED:
            self._circuit_since = datetime.now(UTC)
        elif t.new == CLOSED:
            self._circuit_since = None
        if self.on_transition is not None:
            self.on_transition(t)
        self._circuit_wake.set()
        if t.new in (CLOSED, HALF_OPEN):
            self._want_claim()  # notifications did not stop meanwhile: re-read the queue now

    async def _circuit_loop(self) -> None:
        """Probe /health while open; publish the circuit state for `reactor status` and the feed."""
        while True:
            state = (self.circuit.state, self._circuit_since)
            if state != self._circuit_published:
                try:
                    await self.store.set_circuit(*state)
                    self._circuit_published = state
                except TRANSIENT_ERRORS as exc:
                    logger.warning("cannot record the circuit state: %s", exc)
                except Exception:
                    logger.exception("cannot record the circuit state")
                    await anyio.sleep(1.0)  # and try again
            self._circuit_wake = anyio.Event()
            if self.circuit.state == OPEN and self.circuit.next_probe_at is not None and self.probe:
                with anyio.move_on_after(max(0.0, self.circuit.next_probe_at - time.monotonic())):
                    await self._circuit_wake.wait()
                if self.circuit.state == OPEN and time.monotonic() >= (self.circuit.next_probe_at or 0):
                    ok = await self.probe()
                    self._transition(self.circuit.on_probe(ok, time.monotonic()))
            else:
                await self._circuit_wake.wait()

    def _failure(self, job: ClaimedJob, err: RenderError) -> Outcome:
        decision = decide_failure(
            err.category, job.retry_count, job.max_retries, self.rng,
            retry_after=err.retry_after, backoff_base=self.settings.backoff_base_s,
            backoff_cap=self.settings.backoff_cap_s,
        )
        details: dict[str, Any] = {"at": datetime.now(UTC).isoformat(), "attempt": job.attempt}
        if err.status_code is not None:
            details["status_code"] = err.status_code
        if err.body is not None:
            details["body"] = err.body
        if err.retry_after is not None:
            details["retry_after_s"] = err.retry_after
        if decision.status == "queued":
            details["retry_in_s"] = round(decision.delay_seconds, 3)
        return Outcome(
            job.id, job.attempt, decision.status, decision.retry_count,
            delay_seconds=decision.delay_seconds, error_category=err.category,
            error_message=err.message, error_details=details,
        )

    def _abort(self, entry: _Inflight, reason: str) -> None:
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

    # -- leases -----------------------------------------------------------------------------------

    def _held(self) -> dict[UUID, int]:
        return {i: e.job.attempt for i, e in self.inflight.items()}

    async def _lease_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.renew_every_s)
            held = self._held()
            if not held:
                continue
            try:
                kept = await self.store.renew(held, self.settings.lease_s)
            except TRANSIENT_ERRORS as exc:
                logger.warning("cannot renew leases: %s", exc)
                continue
            except Exception:
                logger.exception("cannot renew leases")
                continue
            self._drop_lost(held, kept)

    async def _reconcile(self) -> None:
        held = self._held()
        if not held:
            return
        try:
            kept = await self.store.still_held(held)
        except TRANSIENT_ERRORS as exc:
            logger.warning("cannot check held jobs: %s", exc)
            return
        except Exception:
            logger.exception("cannot check held jobs")
            return
        self._drop_lost(held, kept)

    def _drop_lost(self, held: dict[UUID, int], kept: set[UUID]) -> None:
        for job_id in held.keys() - kept:
            entry = self.inflight.get(job_id)
            if entry is not None and entry.job.attempt == held[job_id]:
                logger.warning(
                    "job no longer ours (cancelled or rescued); aborting its render",
                    extra={"job_id": str(job_id), "attempt": entry.job.attempt},
                )
                self._abort(entry, "lost")

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

