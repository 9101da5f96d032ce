"""The circuit breaker at work: transitions logged and published, ``/health`` probed while open.

The breaker itself is a pure state machine (reactor/core/circuit.py); the dispatcher feeds it the
outcome of each render. :class:`CircuitWatch` logs each transition (one line), publishes the state in
``reactor.reactors`` (``NOTIFY reactor_fleet``, for ``reactor status`` and the feed), probes
``GET {orchestrator}/health`` with backoff while open, and asks for a claim as soon as the circuit
closes or half-opens (notifications did not stop meanwhile: the queue is re-read).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

import anyio

from reactor.core.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Transition
from reactor.core.errors import DatabaseUnavailable

__all__ = ["CircuitStore", "CircuitWatch", "ProbeFn"]

logger = logging.getLogger(__name__)

ProbeFn = Callable[[], Awaitable[bool]]


class CircuitStore(Protocol):
    async def set_circuit(self, state: str, since: datetime | None) -> None: ...


class CircuitWatch:
    """Acts on the transitions of ``breaker`` (run :meth:`run` next to the dispatcher's loop)."""

    def __init__(self, breaker: CircuitBreaker, store: CircuitStore, probe: ProbeFn | None, *,
                 inflight: Callable[[], int], want_claim: Callable[[], None]) -> None:
        self.breaker = breaker
        self.store = store
        self.probe = probe
        self.on_transition: Callable[[Transition], None] | None = None
        self._inflight = inflight
        self._want_claim = want_claim
        self._wake = anyio.Event()
        self._since: datetime | None = None
        self._published: tuple[str, datetime | None] | None = None

    def transition(self, t: Transition | None) -> None:
        """A transition the breaker made (None: it did not move)."""
        if t is None:
            return
        level = logging.INFO if t.new == CLOSED else logging.WARNING
        logger.log(level, "circuit %s -> %s: %s", t.old, t.new, t.reason,
                   extra={"circuit": t.new, "inflight": self._inflight()})
        if t.new == OPEN and t.old == CLOSED:
            self._since = datetime.now(UTC)
        elif t.new == CLOSED:
            self._since = None
        if self.on_transition is not None:
            self.on_transition(t)
        self._wake.set()
        if t.new in (CLOSED, HALF_OPEN):
            self._want_claim()  # notifications did not stop meanwhile: re-read the queue now

    async def run(self) -> None:
        """Probe /health while open; publish the circuit state for `reactor status` and the feed."""
        circuit = self.breaker
        while True:
            state = (circuit.state, self._since)
            if state != self._published:
                try:
                    await self.store.set_circuit(*state)
                    self._published = state
                except DatabaseUnavailable as exc:
                    logger.warning("cannot record the circuit state: %s", exc)
                except Exception:
                    logger.exception("cannot record the circuit state")
                    await anyio.sleep(1.0)  # and try again
            self._wake = anyio.Event()
            if circuit.state == OPEN and circuit.next_probe_at is not None and self.probe:
                with anyio.move_on_after(max(0.0, circuit.next_probe_at - time.monotonic())):
                    await self._wake.wait()
                if circuit.state == OPEN and time.monotonic() >= (circuit.next_probe_at or 0):
                    ok = await self.probe()
                    self.transition(circuit.on_probe(ok, time.monotonic()))
            else:
                await self._wake.wait()
