"""The reactor's own alerts: evaluated by every reactor, sent by exactly one.

Alerts (thresholds from ``job_queue_config``, read at each evaluation, so an UPDATE applies at once):

====================== ===================================================== ===========================
name                   value                                                 threshold
====================== ===================================================== ===========================
queue_depth            jobs queued                                           ``alert_queue_depth`` (50)
failed_per_hour        jobs that failed for good in the last hour            ``alert_failed_per_hour`` (10)
avg_wait               average wait (insert to start) of jobs started in     ``alert_avg_wait_minutes``
                       the last hour, seconds                                (15 min)
oldest_queued          age of the oldest queued job, seconds: catches        ``alert_avg_wait_minutes``
                       "nothing starts at all", which an average misses      (the same 15 min)
render_farm_unreachable how long the circuit of a live reactor (heartbeat    ``circuit_open_s`` (300 s)
                       within ``reactor_alive_s``) has been open, seconds
====================== ===================================================== ===========================

Hysteresis: an alert fires when its value is **above** the threshold, and resolves only when the
value is **at or below 80 %** of it (``resolve_ratio``): 50 queued fires at 51 and resolves at 40.
A threshold of 0 fires on any value above 0 and resolves at 0.

One sender per fleet: an evaluation is one transaction that first takes
``pg_try_advisory_xact_lock`` (a reactor that does not get it skips this round), reads the figures
(``get_queue_stats()``, ``job_queue_config``, ``reactor.reactors``) and the alerts' state
(``reactor.alerts``, migration 0003), and changes an alert's state with an UPDATE that only matches
while the row holds the old state: whichever reactor's UPDATE flips the row is the one that logs the
transition, sends ``NOTIFY reactor_alerts`` (in the same transaction, so it is sent only if the flip
commits) and posts the webhook. Payload of the NOTIFY (small JSON)::

    {"alert": "queue_depth", "status": "firing" | "resolved", "value": 7, "threshold": 3,
     "since": "<ISO time of this change>", "reactor": "<reactor id>", "summary": "7 jobs queued ..."}

Cost: every ``every_s`` (20 s) one short transaction, except when the fleet is quiet. A reactor
skips the evaluation while its last one saw nothing firing, nothing queued or processing and no
circuit open, no job event or config change was notified since, its own circuit is closed and its
listener connected; it still evaluates every ``idle_every_s`` (300 s). Nothing can start firing in
that state without a notification: depth, failures and waits need job events; the oldest job's age
grows only when something is queued; a circuit opens only on a reactor that is then not quiet.

Webhook (``--alert-webhook URL`` or ``$REACTOR_ALERT_WEBHOOK``): one JSON POST per transition, with a
``text`` that Slack-compatible webhooks show and the structured fields (``alert``, ``status``,
``value``, ``threshold``, ``summary``, ``since``, ``fired_at``, ``reactor``). Connection errors, 408,
429 and 5xx are retried with exponential backoff and jitter (1, 2, 4, 8, 16 s: 6 attempts); other
answers are not. Posts go out one at a time, in order. Delivery is at most once: a reactor that dies
between the flip and the POST loses that POST (the row, the log line of the flip's reactor and the
NOTIFY are committed). Give every reactor of a fleet the same webhook: whichever flips, sends.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus

from reactor.core.environment import Environment
from reactor.core.errors import ConfigError, DatabaseError, SchemaMissing
from reactor.db.alerts import LOCK_KEY, AlertStore
from reactor.ops.webhook import Webhook

__all__ = [
    "ALERTS",
    "CHANNEL",
    "LOCK_KEY",
    "AlertSettings",
    "Alerts",
    "Figures",
    "Transition",
    "Webhook",
    "decide",
    "measure",
    "settings_from",
]

logger = logging.getLogger(__name__)

#: the NOTIFY channel of alert transitions
CHANNEL = "reactor_alerts"
#: the alerts, in the order they are evaluated and reported
ALERTS = ("queue_depth", "failed_per_hour", "avg_wait", "oldest_queued", "render_farm_unreachable")


@dataclass(frozen=True)
class AlertSettings:
    enabled: bool = True
    #: where transitions are POSTed; None: log and NOTIFY only
    webhook_url: str | None = None
    every_s: float = 20.0
    #: while the fleet is quiet, evaluate at least this often anyway
    idle_every_s: float = 300.0
    #: resolve at or below this fraction of the threshold
    resolve_ratio: float = 0.8
    #: render_farm_unreachable: a circuit open (or half-open) longer than this
    circuit_open_s: float = 300.0
    #: a reactor whose heartbeat is older than this is not counted (its circuit is stale)
    reactor_alive_s: float = 120.0
    webhook_timeout_s: float = 10.0
    webhook_attempts: int = 6
    webhook_backoff_s: float = 1.0
    webhook_backoff_cap_s: float = 30.0


def settings_from(webhook_url: str | None, env: Environment | None = None) -> AlertSettings:
    """Alert settings from ``--alert-webhook`` (else ``$REACTOR_ALERT_WEBHOOK`` of ``env``); fail fast
    on a bad URL."""
    url = (webhook_url or (env.alert_webhook if env is not None else None) or "").strip() or None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("--alert-webhook (or REACTOR_ALERT_WEBHOOK) must be an http:// or https:// URL")
    return AlertSettings(webhook_url=url)


# -- the rules (pure) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """What one evaluation read from the database."""

    queued: int = 0
    processing: int = 0
    failed_last_hour: int = 0
    avg_wait_s: float | None = None
    oldest_queued_age_s: float | None = None
    open_circuits: int = 0
    open_circuit_s: float | None = None
    alert_queue_depth: int = 50
    alert_failed_per_hour: int = 10
    alert_avg_wait_minutes: int = 15

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Figures:
        return cls(
            queued=int(row["queued"] or 0), processing=int(row["processing"] or 0),
            failed_last_hour=int(row["failed_last_hour"] or 0), avg_wait_s=row["avg_wait_seconds"],
            oldest_queued_age_s=row["oldest_queued_age_seconds"], open_circuits=int(row["open_circuits"] or 0),
            open_circuit_s=row["open_circuit_seconds"], alert_queue_depth=int(row["alert_queue_depth"]),
            alert_failed_per_hour=int(row["alert_failed_per_hour"]),
            alert_avg_wait_minutes=int(row["alert_avg_wait_minutes"]),
        )


def measure(f: Figures, circuit_open_s: float) -> dict[str, tuple[float, float]]:
    """Each alert's (value, threshold)."""
    wait_threshold = f.alert_avg_wait_minutes * 60.0
    return {
        "queue_depth": (float(f.queued), float(f.alert_queue_depth)),
        "failed_per_hour": (float(f.failed_last_hour), float(f.alert_failed_per_hour)),
        "avg_wait": (round(f.avg_wait_s or 0.0, 1), wait_threshold),
        "oldest_queued": (round(f.oldest_queued_age_s or 0.0, 1), wait_threshold),
        "render_farm_unreachable": (round(f.open_circuit_s or 0.0, 1), float(circuit_open_s)),
    }


def decide(firing: bool, value: float, threshold: float, resolve_ratio: float = 0.8) -> bool:
    """Whether the alert fires after this evaluation: above the threshold to fire, at or below
    ``resolve_ratio`` of it to resolve; in between, it stays as it was."""
    if not firing:
        return value > threshold
    return value > threshold * resolve_ratio


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _summary(name: str, value: float, threshold: float, f: Figures | None) -> str:
    if name == "queue_depth":
        return f"{value:g} jobs queued (threshold {threshold:g}, job_queue_config.alert_queue_depth)"
    if name == "failed_per_hour":
        return f"{value:g} jobs failed in the last hour (threshold {threshold:g}, alert_failed_per_hour)"
    if name == "avg_wait":
        return (f"average wait over the last hour {_duration(value)} "
                f"(threshold {_duration(threshold)}, alert_avg_wait_minutes)")
    if name == "oldest_queued":
        return (f"oldest queued job waiting {_duration(value)} "
                f"(threshold {_duration(threshold)}, alert_avg_wait_minutes)")
    reactors = f.open_circuits if f is not None else 0
    if value <= 0:
        return f"no live reactor has its circuit open (threshold {_duration(threshold)})"
    return (f"circuit open on {reactors} reactor{'' if reactors == 1 else 's'} for {_duration(value)}, "
            f"the render farm unreachable (threshold {_duration(threshold)})")


@dataclass(frozen=True)
class Transition:
    """An alert this reactor fired or resolved."""

    name: str
    firing: bool
    value: float
    threshold: float
    since: datetime
    summary: str
    reactor: str
    fired_at: datetime | None = None  # for a resolution: when it had fired

    @property
    def status(self) -> str:
        return "firing" if self.firing else "resolved"

    def text(self) -> str:
        """What a Slack-compatible webhook shows."""
        if self.firing:
            return f":rotating_light: *FIRING* reactor alert `{self.name}`: {self.summary}"
        lasted = ""
        if self.fired_at is not None:
            lasted = f" after {_duration(max(0.0, (self.since - self.fired_at).total_seconds()))}"
        return f":white_check_mark: *RESOLVED* reactor alert `{self.name}`{lasted}: {self.summary}"

    def payload(self) -> dict[str, Any]:
        return {
            "text": self.text(), "alert": self.name, "status": self.status, "value": self.value,
            "threshold": self.threshold, "summary": self.summary, "since": self.since.isoformat(),
            "fired_at": self.fired_at.isoformat() if self.fired_at else None, "reactor": self.reactor,
            "source": "reactor",
        }


# -- the evaluator --------------------------------------------------------------------------------


@dataclass
class _Last:
    """What the last evaluation saw: enough to tell whether the next one may be skipped."""

    at: float = -math.inf
    quiet: bool = False
    firing: tuple[str, ...] = ()
    evaluations: int = 0
    skipped: int = 0
    not_leader: int = 0
    errors: int = 0


class Alerts:
    """Evaluates the alerts of the fleet (run ``run`` in the service's task group)."""

    def __init__(
        self,
        settings: AlertSettings,
        store: AlertStore,
        reactor_id: str,
        *,
        local_circuit: Callable[[], str] = lambda: "closed",
        listener_connected: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.reactor_id = reactor_id
        self.local_circuit = local_circuit
        self.listener_connected = listener_connected
        self.clock = clock
        self.rng = rng or random.Random()
        self.webhook = Webhook(settings.webhook_url, settings, rng=self.rng) if settings.webhook_url else None
        self.last = _Last()
        self.transitions: list[Transition] = []  # every transition this reactor made
        self._dirty = True
        self._missing_table_logged = False

    @property
    def firing(self) -> tuple[str, ...]:
        """Alerts firing as of this reactor's last evaluation."""
        return self.last.firing

    def poke(self) -> None:
        """Something changed (a job event, a config change, a reconnect): evaluate at the next tick."""
        self._dirty = True

    def may_skip(self) -> bool:
        """True while nothing can have started firing since the last evaluation (see the module doc)."""
        return (
            self.last.quiet and not self._dirty and self.local_circuit() == "closed"
            and self.listener_connected() and self.clock() - self.last.at < self.settings.idle_every_s
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            if self.webhook is not None:
                await tg.start(self.webhook.run)
            task_status.started()
            every = max(0.05, self.settings.every_s)
            while True:
                if self.may_skip():
                    self.last.skipped += 1
                else:
                    await self.evaluate()
                await anyio.sleep(every * (0.9 + 0.2 * self.rng.random()))

    async def evaluate(self) -> list[Transition] | None:
        """One evaluation. Returns the transitions this reactor made, None if it did not evaluate
        (another reactor was evaluating, or the database failed)."""
        self._dirty = False  # cleared first: a notice arriving meanwhile asks for the next round
        try:
            made = await self._evaluate()
        except DatabaseError as exc:
            self.last.quiet = False
            self.last.errors += 1
            if isinstance(exc, SchemaMissing):
                self.last.quiet, self.last.at = True, self.clock()  # retried every idle_every_s
                if not self._missing_table_logged:
                    self._missing_table_logged = True
                    logger.warning("alerts are off: reactor.alerts is missing (run `reactor migrate`)")
            else:
                logger.warning("cannot evaluate the alerts: %s", " ".join(str(exc).split())[:300])
            return None
        if made is None:
            return None
        for t in made:
            self.transitions.append(t)
            extra = {"alert": t.name, "value": t.value, "threshold": t.threshold}
            if t.firing:
                logger.warning("alert firing: %s: %s", t.name, t.summary, extra=extra)
            else:
                logger.info("alert resolved: %s: %s", t.name, t.summary, extra=extra)
            if self.webhook is not None:
                self.webhook.submit(t)
        return made

    async def _evaluate(self) -> list[Transition] | None:
        s = self.settings
        made: list[Transition] = []
        async with self.store.evaluation() as ev:
            if ev is None:
                self.last.not_leader += 1
                self.last.quiet = False  # we did not look: look next time
                self._dirty = True
                return None
            figures = Figures.from_row(await ev.figures(s.reactor_alive_s))
            state = await ev.state()
            missing = [name for name in ALERTS if name not in state]
            if missing:
                await ev.seed(missing)
                state.update({n: {"name": n, "firing": False, "since": None} for n in missing})
            firing_now: list[str] = []
            refresh: list[dict[str, Any]] = []
            for name, (value, threshold) in measure(figures, s.circuit_open_s).items():
                was = bool(state[name]["firing"])
                now = decide(was, value, threshold, s.resolve_ratio)
                if now:
                    firing_now.append(name)
                if now == was:
                    if now:
                        refresh.append({"name": name, "value": value, "threshold": threshold})
                    continue
                summary = _summary(name, value, threshold, figures)
                since = await ev.flip(name, firing=now, value=value, threshold=threshold, reactor=self.reactor_id,
                                      summary=summary)
                if since is None:
                    continue  # someone else changed it first (cannot happen under the lock; harmless)
                made.append(Transition(
                    name=name, firing=now, value=value, threshold=threshold, since=since,
                    summary=summary, reactor=self.reactor_id,
                    fired_at=None if now else state[name]["since"],
                ))
            if refresh:
                await ev.refresh(refresh)
        self.last.at = self.clock()
        self.last.evaluations += 1
        self.last.firing = tuple(firing_now)
        self.last.quiet = (
            not firing_now and figures.queued == 0 and figures.processing == 0 and figures.open_circuits == 0
        )
        return made
