"""What the dispatcher decides, as pure functions of data: nothing here does I/O or reads a clock.

* :class:`DispatchSettings`: the dispatcher's knobs;
* :func:`notice_reaction`: what a notification asks of the dispatcher (claim, re-read the next due
  time, check which jobs it still holds);
* :func:`claim_room`: how many jobs one claim may take;
* :func:`failure_outcome` and :func:`outage_outcome`: how a failed attempt is written back (retried
  with backoff, failed, or put back without spending a retry when the render farm is down).

The dispatcher (reactor/engine/dispatcher.py) acts on the answers; tests/unit/test_dispatch_decisions.py
checks them without a database.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from reactor.core.backoff import backoff
from reactor.core.errors import RenderError
from reactor.core.models import ClaimedJob, Outcome
from reactor.core.notice import Notice
from reactor.core.policy import decide_failure

__all__ = [
    "OUTAGE_STATUSES",
    "DispatchSettings",
    "Reaction",
    "claim_room",
    "failure_outcome",
    "free_requeue_left",
    "is_outage",
    "notice_reaction",
    "outage_outcome",
]

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


#: answers that mean "the render farm is down or overloaded", not "this job is bad"
OUTAGE_STATUSES = frozenset({502, 503})


@dataclass(frozen=True)
class Reaction:
    """What a notification asks of the dispatcher."""

    claim: bool = False  # something may be claimable now
    due_dirty: bool = False  # re-read the next due time (and whether dispatch is paused) before sleeping
    check_lost: bool = False  # a job we render may have been taken from us: check which we still hold


def notice_reaction(notice: Notice, actor: str, inflight: Collection[UUID]) -> Reaction:
    """The dispatcher's reaction to a notification: a pure function of it, our actor and the jobs
    we render (``reactor_events`` and ``reactor_config``; the other channels are the feed's)."""
    if notice.channel == "reactor_config":
        return Reaction(claim=True, due_dirty=True)  # limits changed (paused?): re-read with the due time
    if notice.channel == "reactor_due":
        return Reaction(due_dirty=True)  # a job waits for a future run_after: maybe sooner than we knew
    if notice.channel != "reactor_events":
        return Reaction()
    if notice.truncated:
        return Reaction(claim=True)
    if notice.actor == actor:
        return Reaction()  # our own claim or outcome: already accounted for
    # another reactor's outcomes followed by its own claim ("claiming"): the room they freed and the
    # jobs they put back are that claim's to take, and its NOTIFY says "more" if it left some
    if notice.n == 1:
        return Reaction(
            # a job we render was changed by someone else (cancelled, rescued): check which attempt
            # holds it now, and abort ours if it is no longer ours
            check_lost=notice.job_id in inflight and notice.old_status == "processing",
            due_dirty=notice.kind == "retrying",
            claim=notice.more or (not notice.claiming
                                  and (notice.status == "queued" or notice.old_status == "processing")),
        )
    return Reaction(
        check_lost=notice.cancelled > 0 and len(inflight) > 0,
        due_dirty=notice.queued > 0,
        claim=notice.more or (not notice.claiming and (notice.queued > 0 or notice.finished > 0)),
    )


def claim_room(*, claiming: bool, paused: bool, max_inflight: int, inflight: int, budget: int | None) -> int:
    """How many jobs the next claim may take: none while draining or paused; else what
    ``max_inflight`` leaves, at most the circuit's ``budget`` (None: no limit; open: 0; half-open: 1)."""
    if not claiming or paused:
        return 0
    room = max(0, max_inflight - inflight)
    return room if budget is None else min(room, budget)


def is_outage(err: RenderError) -> bool:
    """The orchestrator could not be reached, or answered 502 or 503: the farm, not the job."""
    return err.transport or err.status_code in OUTAGE_STATUSES


def free_requeue_left(job: ClaimedJob, free_requeues: int) -> bool:
    """Whether this attempt may be put back without spending a retry (``free_requeues`` of them a job)."""
    return job.attempt - 1 - job.retry_count < free_requeues


def _details(job: ClaimedJob, now: datetime) -> dict[str, Any]:
    return {"at": now.isoformat(), "attempt": job.attempt}


def failure_outcome(
    job: ClaimedJob, err: RenderError, rng: random.Random, *, backoff_base_s: float, backoff_cap_s: float,
    now: datetime,
) -> Outcome:
    """A failed attempt: queued again after a backoff while retries remain and the category is
    retryable, else failed; the error and its details (status, body, when) are recorded."""
    decision = decide_failure(
        err.category, job.retry_count, job.max_retries, rng,
        retry_after=err.retry_after, backoff_base=backoff_base_s, backoff_cap=backoff_cap_s,
    )
    details = _details(job, now)
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


def outage_outcome(
    job: ClaimedJob, err: RenderError, rng: random.Random, *, circuit: str, outage: bool,
    backoff_base_s: float, backoff_cap_s: float, now: datetime,
) -> Outcome:
    """Back to the queue without spending a retry: the render farm failed, not the job. While the
    circuit is open (``outage``) it waits for nothing: no claim happens until the farm answers."""
    # not spent, but not claimed again at once either: a first retry's backoff (base to 2 * base)
    delay = 0.0 if outage else backoff(1, base=backoff_base_s, cap=backoff_cap_s, rng=rng)
    if err.retry_after is not None:
        delay = max(delay, err.retry_after)  # the orchestrator asked for it
    details = _details(job, now)
    details.update({"outage": True, "circuit": circuit})
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
