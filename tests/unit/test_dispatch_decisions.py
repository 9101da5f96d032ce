"""The dispatcher's decisions without a database: the pure functions of reactor/engine/decisions.py,
and the Dispatcher itself driven against a fake store (the JobStore protocol) and a fake render."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import anyio
import pytest

from reactor.core.circuit import OPEN
from reactor.core.errors import RenderError, StatementRefused
from reactor.core.models import ClaimedJob, Outcome, RenderRequest, RenderResult
from reactor.engine.decisions import (
    DispatchSettings,
    claim_room,
    failure_outcome,
    free_requeue_left,
    is_outage,
    outage_outcome,
)
from reactor.engine.dispatcher import Dispatcher

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def job(*, retry_count: int = 0, max_retries: int = 3, attempt: int = 1, text: str = "why?") -> ClaimedJob:
    return ClaimedJob(
        id=uuid4(), job_type="doubt", priority="medium", payload={"question": text}, user_id=None,
        renderer="manim", retry_count=retry_count, max_retries=max_retries, attempt=attempt, created_at=NOW,
        input_field="question", type_defaults={}, timeout_minutes=10,
    )


def answered(status: int, *, retry_after: float | None = None) -> RenderError:
    category = {400: "INVALID_INPUT", 404: "NOT_FOUND"}.get(status, "API_ERROR")
    return RenderError(category, f"orchestrator answered {status}", status_code=status, body="nope",
                       retry_after=retry_after)


def unreachable() -> RenderError:
    err = RenderError("TIMEOUT", "cannot connect to the orchestrator")
    err.transport = True
    return err


# -- pure decisions ---------------------------------------------------------------------------------


def test_claim_room_is_what_max_inflight_leaves_within_the_circuit_budget() -> None:
    def room(inflight: int, budget: int | None) -> int:
        return claim_room(claiming=True, paused=False, max_inflight=8, inflight=inflight, budget=budget)

    assert room(3, None) == 5
    assert room(9, None) == 0
    assert room(0, 1) == 1  # half-open: one trial job
    assert room(0, 0) == 0  # open: nothing
    assert claim_room(claiming=True, paused=True, max_inflight=8, inflight=0, budget=None) == 0
    assert claim_room(claiming=False, paused=False, max_inflight=8, inflight=0, budget=None) == 0


def test_a_retryable_failure_is_queued_again_with_backoff_and_its_details() -> None:
    j = job(retry_count=1)
    out = failure_outcome(j, answered(500), random.Random(1), backoff_base_s=2.0, backoff_cap_s=300.0, now=NOW)
    assert (out.status, out.retry_count, out.error_category) == ("queued", 2, "API_ERROR")
    assert 2.0 <= out.delay_seconds <= 4.0  # the second retry: within [d/2, d], d = 2 * 2**1
    assert out.error_details == {"at": NOW.isoformat(), "attempt": 1, "status_code": 500, "body": "nope",
                                 "retry_in_s": round(out.delay_seconds, 3)}


def test_retry_after_is_a_lower_bound_of_the_backoff() -> None:
    out = failure_outcome(job(), answered(429, retry_after=90.0), random.Random(1), backoff_base_s=2.0,
                          backoff_cap_s=300.0, now=NOW)
    assert out.status == "queued" and out.delay_seconds == 90.0
    assert out.error_details is not None and out.error_details["retry_after_s"] == 90.0


@pytest.mark.parametrize(("err", "retry_count"), [(answered(400), 0), (answered(404), 0), (answered(500), 3)])
def test_a_bad_job_or_one_out_of_retries_fails(err: RenderError, retry_count: int) -> None:
    out = failure_outcome(job(retry_count=retry_count), err, random.Random(1), backoff_base_s=2.0,
                          backoff_cap_s=300.0, now=NOW)
    assert (out.status, out.retry_count, out.delay_seconds) == ("failed", retry_count, 0.0)


def test_an_outage_puts_the_job_back_without_spending_a_retry() -> None:
    j = job(retry_count=2)
    during = outage_outcome(j, unreachable(), random.Random(1), circuit=OPEN, outage=True,
                            backoff_base_s=2.0, backoff_cap_s=300.0, now=NOW)
    assert (during.status, during.retry_count, during.delay_seconds) == ("queued", 2, 0.0)
    assert during.error_details == {"at": NOW.isoformat(), "attempt": 1, "outage": True, "circuit": OPEN}
    assert during.error_message is not None and during.error_message.endswith("without spending a retry)")
    before = outage_outcome(j, answered(503, retry_after=7.0), random.Random(1), circuit="closed", outage=False,
                            backoff_base_s=2.0, backoff_cap_s=300.0, now=NOW)
    assert before.delay_seconds == 7.0  # the orchestrator's Retry-After, above base..2*base
    quick = outage_outcome(j, answered(502), random.Random(1), circuit="closed", outage=False,
                           backoff_base_s=2.0, backoff_cap_s=300.0, now=NOW)
    assert 2.0 <= quick.delay_seconds <= 4.0


def test_what_counts_as_an_outage_and_how_many_free_requeues_a_job_gets() -> None:
    assert is_outage(unreachable()) and is_outage(answered(502)) and is_outage(answered(503))
    assert not is_outage(answered(500)) and not is_outage(answered(404))
    assert free_requeue_left(job(attempt=10, retry_count=0), 10)  # 9 free requeues so far
    assert not free_requeue_left(job(attempt=11, retry_count=0), 10)
    assert free_requeue_left(job(attempt=11, retry_count=1), 10)  # one attempt spent a retry


# -- the dispatcher against a fake store --------------------------------------------------------------


class FakeStore:
    """The JobStore protocol in memory: a queue of jobs to hand out, outcomes recorded, leases kept."""

    reactor_id = "fake"

    def __init__(self, jobs: list[ClaimedJob]) -> None:
        self.queue = list(jobs)
        self.written: list[Outcome] = []
        self.refused: set[UUID] = set()  # outcomes of these jobs are refused (StatementRefused)
        self.lost: set[UUID] = set()  # leases no longer ours
        self.claims: list[int] = []
        self.circuit: list[str] = []

    async def finish_and_claim(self, outcomes: list[Outcome], max_jobs: int, lease_s: float,
                               clock: datetime) -> tuple[set[UUID], list[ClaimedJob]]:
        if any(o.job_id in self.refused and o.status != "failed" for o in outcomes):
            raise StatementRefused("the database refused finish_and_claim: a check constraint")
        self.written.extend(outcomes)
        self.claims.append(max_jobs)
        taken, self.queue = self.queue[:max_jobs], self.queue[max_jobs:]
        return {o.job_id for o in outcomes}, taken

    async def renew(self, held: dict[UUID, int], lease_s: float) -> set[UUID]:
        return set(held) - self.lost

    async def still_held(self, held: dict[UUID, int]) -> set[UUID]:
        return set(held) - self.lost

    async def next_wakeups(self) -> dict[str, Any]:
        return {"paused": False, "next_due": None, "db_now": datetime.now(UTC)}

    async def release_strays(self, known: set[UUID], free_requeues: int, reason: str) -> list[dict[str, Any]]:
        return []

    async def set_circuit(self, state: str, since: datetime | None) -> None:
        self.circuit.append(state)

    def outcome(self, job_id: UUID) -> Outcome:
        [found] = [o for o in self.written if o.job_id == job_id]
        return found


def result() -> RenderResult:
    return RenderResult.model_validate({"video_url": "http://videos/x.mp4", "duration": 1.0,
                                        "processing_time_ms": 5})


FAST = DispatchSettings(max_inflight=4, lease_s=1.0, renew_every_s=0.05, drain_grace_s=0.2, circuit_threshold=3)


@asynccontextmanager
async def dispatching(store: FakeStore, render: Callable[[RenderRequest, float], Awaitable[RenderResult]],
                      settings: DispatchSettings = FAST) -> AsyncIterator[Dispatcher]:
    dispatcher = Dispatcher(store, render, settings, rng=random.Random(7))
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        yield dispatcher
        tg.cancel_scope.cancel()


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


async def test_claims_renders_and_writes_outcomes_in_later_round_trips() -> None:
    jobs = [job(text=f"q{i}") for i in range(6)]
    store = FakeStore(jobs)

    async def render(request: RenderRequest, timeout_s: float) -> RenderResult:
        if request.input == "q2":
            raise answered(500)
        return result()

    async with dispatching(store, render) as d:
        await until(lambda: len(store.written) == 6, "every outcome written")
    assert store.claims[0] == 4  # max_inflight bounds the first claim
    assert {store.outcome(j.id).status for j in jobs if j is not jobs[2]} == {"completed"}
    retry = store.outcome(jobs[2].id)
    assert (retry.status, retry.retry_count, retry.error_category) == ("queued", 1, "API_ERROR")
    assert (d.stats.claimed, d.stats.completed, d.stats.retried) == (6, 5, 1)
    assert not d.inflight


async def test_a_refused_outcome_is_written_alone_and_replaced_by_a_failure() -> None:
    good, bad = job(text="good"), job(text="bad")
    store = FakeStore([good, bad])
    store.refused.add(bad.id)
    both = anyio.Event()
    started: list[str] = []

    async def render(request: RenderRequest, timeout_s: float) -> RenderResult:
        started.append(request.input)
        if len(started) == 2:
            both.set()
        await both.wait()  # both finish together: their outcomes share one round trip
        return result()

    async with dispatching(store, render):
        await until(lambda: {o.job_id for o in store.written} == {good.id, bad.id}, "both outcomes written")
    assert store.outcome(good.id).status == "completed"
    stand_in = store.outcome(bad.id)
    assert (stand_in.status, stand_in.error_category) == ("failed", "UNKNOWN")
    assert stand_in.error_message is not None and "could not be recorded" in stand_in.error_message


async def test_a_render_whose_lease_was_lost_is_aborted() -> None:
    j = job()
    store = FakeStore([j])
    aborted = anyio.Event()

    async def render(request: RenderRequest, timeout_s: float) -> RenderResult:
        try:
            await anyio.sleep_forever()
        finally:
            aborted.set()
        raise AssertionError("unreachable")

    async with dispatching(store, render) as d:
        await until(lambda: j.id in d.inflight, "the render to start")
        store.lost.add(j.id)  # a sweep took it back: the next renewal says so
        with anyio.fail_after(5):
            await aborted.wait()
        await until(lambda: not d.inflight, "the render to be forgotten")
    assert store.written == [] and d.stats.discarded == 1  # nothing is written for a job not ours


async def test_the_circuit_opens_after_outages_and_jobs_go_back_without_spending_retries() -> None:
    jobs = [job(text=f"q{i}") for i in range(5)]
    store = FakeStore(jobs)

    async def render(request: RenderRequest, timeout_s: float) -> RenderResult:
        raise unreachable()

    settings = replace(FAST, max_inflight=1)
    async with dispatching(store, render, settings) as d:
        await until(lambda: d.circuit.state == OPEN and len(store.written) == 3, "the circuit to open")
        await until(lambda: OPEN in store.circuit, "the state to be published")
        assert d.circuit.claim_budget() == 0
        assert store.claims[-1] == 0  # open: the last round trip wrote outcomes, claimed nothing
    assert [o.status for o in store.written] == ["queued"] * 3
    assert [o.retry_count for o in store.written] == [0, 0, 0]
    # put back after a short backoff while the circuit was closed; once it opened, at once (nothing is
    # claimed until the farm answers a probe anyway)
    assert [o.delay_seconds > 0 for o in store.written] == [True, True, False]
    assert len(store.queue) == 2  # never claimed while open


async def test_draining_puts_back_renders_that_outlast_the_grace() -> None:
    j = job(retry_count=1)
    store = FakeStore([j])

    async def render(request: RenderRequest, timeout_s: float) -> RenderResult:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with dispatching(store, render) as d:
        await until(lambda: j.id in d.inflight, "the render to start")
        await d.drain()
        assert not d.claiming
    back = store.outcome(j.id)
    assert (back.status, back.retry_count, back.error_category) == ("queued", 1, None)
    assert d.stats.released == 1
