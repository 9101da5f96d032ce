"""The one backoff: exponential, capped, with equal jitter. Every retry loop of the reactor uses it.

The delay before the retry that follows ``attempt`` earlier ones (0: the first retry) is random in
``[d/2, d]``, ``d = min(cap, base * 2**attempt)``: half of it fixed, so a retry never comes at
once, half random, so that a fleet hit by the same fault does not retry in step. Pure: the
randomness comes in as an argument, and :meth:`Backoff.due` takes the clock's ``now``, so every
delay is tested without sleeping.

Where it is used: a job's retry (core/policy.py, base 2 s, cap 5 min), the circuit's health probes
(core/circuit.py), restarting a failed part (engine/supervise.py), the listener's reconnects
(engine/listener.py), the dispatcher's round trips while the database is away or refuses a claim
(engine/dispatcher.py), the feed's reads of the event log (web/fanout.py), the alert webhook
(ops/webhook.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff", "backoff"]

#: 2 ** 60 of any base is past any cap; no float overflow
_MAX_EXPONENT = 60


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before the retry that follows ``attempt`` earlier ones (0: the first retry)."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    return ceiling / 2 + rng.random() * ceiling / 2


@dataclass
class Backoff:
    """A retry loop's backoff: :meth:`delay` (or :meth:`due`) for the next retry, :meth:`reset` after
    a success."""

    base: float
    cap: float
    rng: random.Random = field(default_factory=random.Random)
    #: retries so far since the last success
    attempt: int = 0

    def delay(self) -> float:
        """Seconds to wait before the next retry (and count it)."""
        seconds = backoff(self.attempt, base=self.base, cap=self.cap, rng=self.rng)
        self.attempt += 1
        return seconds

    def due(self, now: float) -> float:
        """When the next retry is due, on the clock that gave ``now`` (and count it)."""
        return now + self.delay()

    def reset(self) -> None:
        self.attempt = 0
