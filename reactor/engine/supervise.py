"""Keep the service's parts running: restart a part that fails, give up on one that cannot stay up.

The long-running parts of a reactor (the dispatcher, the listener, the feed, the sweeper, the alert
loop, the systemd watchdog) each run under :meth:`PartSupervisor.run`, all in the service's one task
group:

* **The first start gates readiness, as before.** ``await tg.start(supervisor.run, part)`` returns
  once the part called ``task_status.started()`` (LISTEN live, port bound). A part that fails before
  its first start fails the service's start: a port in use or a refused database is not something a
  restart in the same process fixes.
* **Restart.** After that, any exception but cancellation is logged once, with its traceback (this is
  where nobody can catch it), and the part is started again after :func:`restart_delay`: ``base_s``
  (1 s), doubled with each recent failure, at most ``cap_s`` (30 s), with equal jitter (half fixed,
  half random, so that a fleet hit by the same fault does not restart in step). Until the part calls
  ``started()`` again its state reads ``restarting: ValueError: ... (2 restarts)``; a required part
  that is not running makes ``/readyz`` answer 503 and name it.
* **Give up.** :func:`should_give_up`: ``give_up_after`` failures (5) of one part within ``window_s``
  (60 s). Backoff included, a part that fails as soon as it starts gives up after about 15 s. The part
  is marked ``failed: ...``, the service drains and stops, and :class:`PartFailed` (a ReactorError)
  leaves ``Service.run``: ``reactor run`` exits 2, and systemd (``Restart=on-failure``) starts a fresh
  process, the strongest reset there is. A part that fails less often than that is restarted for as
  long as it takes, and reported meanwhile.

**The dispatcher is restarted too.** Its renders run in its own task group, so by the time its
failure reaches the supervisor every render of the failed incarnation has been cancelled and awaited
(structured concurrency): nothing of it still runs, and a new incarnation cannot render a job twice
in this process. The jobs those renders held stay ``processing`` under this reactor's lease, which
nobody renews any more. The new incarnation cannot claim them (a claim takes queued rows only); the
sweep takes them back once the lease expires (``--lease-seconds``), exactly as after a crash of the
whole process, and the lease check discards any late outcome of the old attempt. What a restart keeps
that an exit would lose: outcomes already waiting to be written (the dispatcher's outbox) are written
by the next incarnation, and the listener, feed and sweep never stop. Before each restart the service
forgets in-flight entries (none can be running; one whose task was cancelled before it ran would
otherwise have its lease renewed forever) and has the dispatcher re-read the queue. Letting renders
carry on across a restart of the loop would need the dispatcher to take its render task group from
outside; it does not today.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from reactor.core.backoff import backoff
from reactor.core.errors import PartFailed

__all__ = [
    "Part",
    "PartFailed",
    "PartSupervisor",
    "RestartPolicy",
    "describe_error",
    "restart_delay",
    "should_give_up",
]

logger = logging.getLogger(__name__)

RUNNING = "running"
STARTING = "starting"


@dataclass(frozen=True)
class RestartPolicy:
    #: the delay before the first restart (halved at most by the jitter)
    base_s: float = 1.0
    #: no restart waits longer than this
    cap_s: float = 30.0
    #: this many failures of one part within ``window_s``: give up (the process exits)
    give_up_after: int = 5
    window_s: float = 60.0


def restart_delay(failures: int, policy: RestartPolicy, rng: random.Random) -> float:
    """Seconds before the restart that follows the ``failures``-th recent failure (1: the first):
    ``base_s * 2 ** (failures - 1)``, at most ``cap_s``, with equal jitter (between half and all of it)."""
    return backoff(max(failures, 1) - 1, base=policy.base_s, cap=policy.cap_s, rng=rng)


def recent(failures_at: Sequence[float], now: float, window_s: float) -> list[float]:
    """The failure times that fall within the window ending ``now``."""
    return [t for t in failures_at if now - t < window_s]


def should_give_up(failures_at: Sequence[float], now: float, policy: RestartPolicy) -> bool:
    """True once ``give_up_after`` failures (the latest included) fall within ``window_s`` of ``now``."""
    return len(recent(failures_at, now, policy.window_s)) >= max(1, policy.give_up_after)


def describe_error(exc: BaseException) -> str:
    """``ValueError: bad value`` on one line (the one error inside a task group's group, if so)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PartRun(Protocol):
    """A part's ``run``: serves until cancelled; ``task_status.started()`` once it is up."""

    def __call__(self, *, task_status: TaskStatus[None]) -> Awaitable[None]: ...


@dataclass(frozen=True)
class Part:
    name: str
    run: PartRun
    #: a required part that is not running makes the reactor not ready (/readyz 503)
    required: bool = True
    #: called before each restart (not before the first start): reset what the failure left behind
    before_restart: Callable[[], None] | None = None


@dataclass
class _State:
    required: bool
    state: str = STARTING
    restarts: int = 0
    failures_at: list[float] = field(default_factory=list)


class _Started:
    """The task status handed to a part: marks it running, and forwards the first start."""

    def __init__(self, state: _State, forward: TaskStatus[None] | None) -> None:
        self._state = state
        self._forward = forward
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self._state.state = RUNNING
        if self._forward is not None:
            self._forward.started()


class PartSupervisor:
    """Runs each part, restarts it when it fails, and reports every part's state."""

    def __init__(
        self,
        policy: RestartPolicy | None = None,
        *,
        on_give_up: Callable[[PartFailed], None] = lambda failed: None,
        on_restart: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.on_give_up = on_give_up
        self.on_restart = on_restart
        self.clock = clock
        self.rng = rng or random.Random()
        #: the first part that failed too often (the service stops, then raises it)
        self.gave_up: PartFailed | None = None
        self._parts: dict[str, _State] = {}

    def states(self) -> dict[str, str]:
        """Each part's state: ``running``, ``starting``, ``restarting: ...``, ``failed: ...``, ``stopped``."""
        return {name: s.state for name, s in self._parts.items()}

    def down(self) -> list[str]:
        """The required parts that are not running now."""
        return [name for name, s in self._parts.items() if s.required and s.state != RUNNING]

    def report(self) -> tuple[bool, Mapping[str, str]]:
        """For /readyz: whether every required part runs, and each part's state."""
        return not self.down(), self.states()

    def restarts(self, name: str) -> int:
        return self._parts[name].restarts if name in self._parts else 0

    async def run(self, part: Part, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run ``part`` until cancelled, restarting it when it fails; returns when it gives up."""
        st = self._parts[part.name] = _State(part.required)
        first = True
        while True:
            st.state = STARTING
            status = _Started(st, task_status if first else None)
            try:
                await part.run(task_status=status)
            except Exception as exc:
                if (first and not status.done) or anyio.current_effective_deadline() == -math.inf:
                    raise  # the service's start fails, as before; or we are being cancelled anyway
                delay = self._failed(part.name, st, exc)
                if delay is None:
                    return
            else:
                st.state = "stopped"  # it finished on its own: nothing to restart
                return
            await anyio.sleep(delay)
            if part.before_restart is not None:
                part.before_restart()
            first = False

    def _failed(self, name: str, st: _State, exc: Exception) -> float | None:
        """Record a failure and log it (with the traceback); the delay before the restart, None: give up."""
        now = self.clock()
        st.failures_at = [*recent(st.failures_at, now, self.policy.window_s), now]
        what = describe_error(exc)
        extra = {"part": name, "restarts": st.restarts}
        if should_give_up(st.failures_at, now, self.policy):
            st.state = f"failed: {what}"
            failed = PartFailed(name, len(st.failures_at), self.policy.window_s, what)
            logger.exception("%s failed %d times within %.0f s: giving up, the reactor stops", name,
                             len(st.failures_at), self.policy.window_s, extra=extra, exc_info=exc)
            if self.gave_up is None:
                self.gave_up = failed
            self.on_give_up(failed)
            return None
        delay = restart_delay(len(st.failures_at), self.policy, self.rng)
        st.restarts += 1
        extra["restarts"] = st.restarts
        st.state = f"restarting: {what} ({st.restarts} restart{'' if st.restarts == 1 else 's'})"
        logger.exception("%s failed unexpectedly: restart %d in %.1f s", name, st.restarts, delay,
                         extra=extra, exc_info=exc)
        self.on_restart(name)
        return delay
