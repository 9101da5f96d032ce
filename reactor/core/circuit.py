"""The circuit breaker around the orchestrator: a pure state machine (time and randomness passed in).

closed     renders flow. A run of ``threshold`` consecutive failures that say "the render farm is
           down" (connection refused or reset, connect timeout, 502, 503) opens the circuit. Any
           other answer (success, 4xx, 500, a malformed body) ends the run: the farm is up.
open       nothing is claimed; jobs stay queued, untouched. ``/health`` is probed with exponential
           backoff and jitter, capped; a successful probe (or a successful render still in flight)
           moves to half-open.
half_open  one job goes through. Its success closes the circuit (full dispatch resumes at once);
           another outage failure opens it again and the probe backoff keeps growing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from reactor.core.backoff import backoff

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker", "Transition"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Transition:
    old: str
    new: str
    at: float
    reason: str


@dataclass
class CircuitBreaker:
    threshold: int = 5
    probe_base_s: float = 1.0
    probe_cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    state: str = CLOSED
    failures: int = 0  # consecutive outage failures while closed
    opened_at: float | None = None  # start of the current outage (kept through half-open)
    probes: int = 0  # probes sent in this outage
    next_probe_at: float | None = None
    trial_in_flight: bool = False
    transitions: list[Transition] = field(default_factory=list)

    # -- what the dispatcher asks ---------------------------------------------------------------

    def claim_budget(self) -> int | None:
        """How many jobs may be claimed now: None for no limit, else a number (0 or 1)."""
        if self.state == CLOSED:
            return None
        if self.state == HALF_OPEN and not self.trial_in_flight:
            return 1
        return 0

    def trial_started(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_in_flight = True

    # -- what happened ----------------------------------------------------------------------------

    def on_success(self, now: float) -> Transition | None:
        """A render succeeded (or the orchestrator answered about the job itself)."""
        self.failures = 0
        if self.state == CLOSED:
            return None
        return self._move(CLOSED, now, "a render succeeded")

    def on_outage_failure(self, now: float) -> Transition | None:
        """A render failed because the orchestrator is unreachable or overloaded."""
        if self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                return self._open(now, f"{self.failures} renders in a row could not reach the orchestrator")
            return None
        if self.state == HALF_OPEN:
            return self._open(now, "the trial render failed")
        return None

    def on_probe(self, ok: bool, now: float) -> Transition | None:
        """Result of a ``GET /health`` probe while open."""
        if self.state != OPEN:
            return None
        if ok:
            return self._move(HALF_OPEN, now, "the health probe answered")
        self._schedule_probe(now)
        return None

    def is_outage(self) -> bool:
        return self.state != CLOSED

    # -- internals ----------------------------------------------------------------------------------

    def probe_delay(self) -> float:
        """Exponential backoff with jitter for the next probe: in [d/2, d], d = min(cap, base*2**n)."""
        return backoff(self.probes, base=self.probe_base_s, cap=self.probe_cap_s, rng=self.rng)

    def _schedule_probe(self, now: float) -> None:
        self.next_probe_at = now + self.probe_delay()
        self.probes += 1

    def _open(self, now: float, reason: str) -> Transition:
        if self.opened_at is None:
            self.opened_at = now
        self.trial_in_flight = False
        t = self._move(OPEN, now, reason)
        self._schedule_probe(now)
        return t

    def _move(self, new: str, now: float, reason: str) -> Transition:
        t = Transition(self.state, new, now, reason)
        self.state = new
        self.trial_in_flight = False
        if new == CLOSED:
            self.failures = 0
            self.opened_at = None
            self.probes = 0
            self.next_probe_at = None
        self.transitions.append(t)
        return t
