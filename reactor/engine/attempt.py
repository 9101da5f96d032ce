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
from reactor.core.models import ClaimedJob, Outcome, RenderRequest, RenderResult
from reactor.core.policy import InvalidPayload, build_request
from reactor.engine.circuit_watch import CircuitWatch
from reactor.engine.decisions import (
    DispatchSettings,
    failure_outcome,
    free_requeue_left,
    is_outage,
    outage_outcome,
)

__all__ = ["RenderFn", "attempt"]

logger = logging.getLogger(__name__)

RenderFn = Callable[[RenderRequest, float], Awaitable[RenderResult]]


async def attempt(job: ClaimedJob, render: RenderFn, settings: DispatchSettings, circuit: CircuitBreaker,
                  watch: CircuitWatch, rng: random.Random) -> Outcome:
    """Render ``job`` once; its outcome (completed, queued again, or failed). Never raises but for
    cancellation (a render aborted: lost, cancelled, or drained)."""

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
    try:
        result = await render(request, timeout)
    except RenderError as exc:
        if is_outage(exc):
            watch.transition(circuit.on_outage_failure(time.monotonic()))
            if free_requeue_left(job, settings.free_requeues):
                return outage_outcome(job, exc, rng, circuit=circuit.state, outage=circuit.is_outage(),
                                      backoff_base_s=settings.backoff_base_s, backoff_cap_s=settings.backoff_cap_s,
                                      now=datetime.now(UTC))
        elif exc.status_code is not None or exc.category == "UNKNOWN":
            # the orchestrator answered: whatever is wrong is about this job, not the farm
            watch.transition(circuit.on_success(time.monotonic()))
        return failure(exc)
    except Exception as exc:  # a bug or an unexpected library error must not stop the reactor
        logger.exception("render of job %s failed unexpectedly", job.id)
        return failure(RenderError("UNKNOWN", f"unexpected error: {exc!r}"[:500]))
    watch.transition(circuit.on_success(time.monotonic()))
    return Outcome(job.id, job.attempt, "completed", job.retry_count, result=result.to_json())
