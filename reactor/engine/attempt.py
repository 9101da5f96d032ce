"""One attempt of one job: build its request, render it, and turn whatever happens into its outcome.

This is the bulkhead: a payload that cannot be used, an answer that cannot be read, a bug in either
fails or retries this job alone and never stops the dispatcher. Each render's answer also feeds the
circuit breaker: an unreachable or overloaded farm (connection refused or reset, 502, 503) counts
against it and puts the job back without spending a retry; any other answer says the farm is up.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from reactor.core.circuit import CircuitBreaker
from reactor.core.errors import RenderError
from reactor.core.models import CacheDecision, ClaimedJob, Outcome, RenderRequest, RenderResult
from reactor.core.policy import InvalidPayload, build_request, wants_cache
from reactor.engine.circuit_watch import CircuitWatch
from reactor.engine.decisions import (
    DispatchSettings,
    failure_outcome,
    free_requeue_left,
    is_outage,
    outage_outcome,
)

__all__ = ["PARKED", "CacheFn", "RenderFn", "attempt"]

logger = logging.getLogger(__name__)

RenderFn = Callable[[RenderRequest, float], Awaitable[RenderResult]]
#: the render cache (reactor/db/store.py ``Database.cache_take``): the job, its request and key, and
#: how long a waiter stays parked without news
CacheFn = Callable[[ClaimedJob, RenderRequest, str, float], Awaitable[CacheDecision]]
#: the status of an attempt's outcome when the job now waits for another job rendering the same
#: request: the database already queued it again, there is nothing to write
PARKED = "parked"
#: how long a job waiting for an identical render stays parked without news: the renderer's outcome
#: settles it at once; should the renderer end some other way (failed by the sweep, cancelled by
#: hand), the waiter is claimed again after this and renders (or waits again while it still runs)
CACHE_WAIT_S = 120.0


async def attempt(job: ClaimedJob, render: RenderFn, settings: DispatchSettings, circuit: CircuitBreaker,
                  watch: CircuitWatch, rng: random.Random, cache: CacheFn | None = None) -> Outcome:
    """Render ``job`` once; its outcome (completed, queued again, or failed; :data:`PARKED` when it
    waits for an identical render). Never raises but for cancellation (a render aborted: lost,
    cancelled, or drained). With ``cache``, the render cache is asked first: a hit completes the job
    without a render call; a problem with the cache only means the job renders."""

    def failure(err: RenderError) -> Outcome:
        return failure_outcome(job, err, rng, backoff_base_s=settings.backoff_base_s,
                               backoff_cap_s=settings.backoff_cap_s, now=datetime.now(UTC))

    try:
        request = build_request(job)
    except InvalidPayload as exc:
        return failure(RenderError("INVALID_INPUT", str(exc)))
    except Exception as exc:  # a bug here must fail this job alone
        logger.exception("the request for job %s could not be built", job.id)
        return failure(RenderError("INVALID_INPUT", f"the request could not be built: {exc!r}"[:500]))
    timeout = job.timeout_minutes * 60.0
    if settings.max_render_timeout_s is not None:
        timeout = min(timeout, settings.max_render_timeout_s)
    # the claim resolved the request in SQL and keyed it (None: the job does not use the cache); it
    # said "render" when no render was there to share, and then there is nothing to ask
    key = job.cache_key if cache is not None and wants_cache(job) else None
    if cache is not None and key is not None and job.cache_state != "render":
        try:
            decision = await cache(job, request, key, CACHE_WAIT_S)
        except Exception as exc:  # the cache is an optimisation: without it, the job renders
            logger.warning("render cache unavailable for job %s: %s", job.id, exc)
            decision = CacheDecision("render")
            key = None
        if decision.kind == "hit" and decision.result is not None:
            return Outcome(job.id, job.attempt, "completed", job.retry_count, result=decision.result)
        if decision.kind == "wait":
            return Outcome(job.id, job.attempt, PARKED, job.retry_count)
        if decision.kind != "render":
            key = None
    try:
        result = await render(request, timeout)
    except RenderError as exc:
        if is_outage(exc):
            watch.transition(circuit.on_outage_failure(time.monotonic()))
            if free_requeue_left(job, settings.free_requeues):
                return _keyed(key, outage_outcome(
                    job, exc, rng, circuit=circuit.state, outage=circuit.is_outage(),
                    backoff_base_s=settings.backoff_base_s, backoff_cap_s=settings.backoff_cap_s,
                    now=datetime.now(UTC)))
        elif exc.status_code is not None or exc.category == "UNKNOWN":
            # the orchestrator answered: whatever is wrong is about this job, not the farm
            watch.transition(circuit.on_success(time.monotonic()))
        return _keyed(key, failure(exc))
    except Exception as exc:  # a bug or an unexpected library error must not stop the reactor
        logger.exception("render of job %s failed unexpectedly", job.id)
        return _keyed(key, failure(RenderError("UNKNOWN", f"unexpected error: {exc!r}"[:500])))
    watch.transition(circuit.on_success(time.monotonic()))
    return Outcome(job.id, job.attempt, "completed", job.retry_count, result=result.to_json(), cache_key=key)


def _keyed(key: str | None, outcome: Outcome) -> Outcome:
    """The outcome of a render under ``key``: written, it settles the jobs waiting for that render."""
    outcome.cache_key = key
    return outcome
