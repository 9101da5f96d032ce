"""The running reactor: one task group owns the listener, the dispatcher, the sweep and the scheduler.

Start order: database pool, dispatcher, LISTEN (so no wake-up is missed), the feed and probes
(with ``--listen``: port bound), sweep, scheduler (periodic schedules); then ready. Each of these
parts (and the alert loop and the systemd watchdog) runs under a
:class:`~reactor.engine.supervise.PartSupervisor`: one that fails is restarted with backoff and
reported on ``/readyz``; one that fails too often stops the reactor, and ``run`` raises
:class:`~reactor.engine.supervise.PartFailed` (reactor/engine/supervise.py).
SIGTERM (or SIGINT) drains: stop claiming, let renders finish within the grace period, abort and
return the rest to the queue without spending a retry, exit 0. A second signal aborts at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

import anyio
from anyio.abc import TaskStatus

from reactor.core.errors import DatabaseUnavailable
from reactor.core.notice import Notice
from reactor.db.alerts import AlertStore
from reactor.db.store import Database
from reactor.engine.dispatcher import Dispatcher, DispatchSettings
from reactor.engine.listener import Listener
from reactor.engine.scheduler import Scheduler
from reactor.engine.supervise import Part, PartFailed, PartSupervisor, RestartPolicy
from reactor.engine.sweeper import Sweeper
from reactor.ops.actions import RunbookActions
from reactor.ops.alerts import ALERTS as ALERT_NAMES
from reactor.ops.alerts import Alerts, AlertSettings
from reactor.ops.systemd import Notifier, Supervisor, SystemdSettings, describe
from reactor.render.client import RenderClient
from reactor.web.dashboard import Dashboard
from reactor.web.feed import Feed, FeedSettings
from reactor.web.metrics import Metrics

__all__ = ["Service", "ServiceSettings", "new_reactor_id"]

logger = logging.getLogger(__name__)


def new_reactor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class ServiceSettings:
    """Everything a running reactor is told, built once (reactor/cli/settings.py builds it from the
    arguments and the environment) and passed down: the parts read their own part of it."""

    dsn: str = field(repr=False)  # it may hold a password
    orchestrator_url: str = field(repr=False)  # it may hold credentials (sent as Basic authorization)
    reactor_id: str = field(default_factory=new_reactor_id)
    sweep_every_s: float = 30.0
    #: sweeps start at least this far apart, however often something wakes the sweeper
    sweep_min_gap_s: float = 1.0
    #: how long past job_timeout_minutes the sweep waits before it takes a job back
    timeout_grace_s: float = 30.0
    #: a job in processing with no lease (set by hand) is taken back after this long
    orphan_after_s: float = 30.0
    listener_idle_check_s: float = 60.0
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    handle_signals: bool = True
    #: the live feed and HTTP probes (``--listen``); None: not served
    feed: FeedSettings | None = None
    #: the fleet's alerts, evaluated here (reactor/ops/alerts.py)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    #: under systemd ($NOTIFY_SOCKET): watchdog pings stop once the listener (or a required part) is
    #: down this long
    listener_grace_s: float = 120.0
    #: the scheduler looks at the schedules at least this often (it sleeps until the next slot and
    #: is woken by NOTIFY reactor_schedules; this is a safety net)
    schedule_max_sleep_s: float = 300.0
    #: restarting a part that failed, and when to give up (reactor/engine/supervise.py)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    #: what systemd passed the process ($NOTIFY_SOCKET, $WATCHDOG_USEC): none, unless run by systemd
    systemd: SystemdSettings = field(default_factory=SystemdSettings)


class Service:
    def __init__(self, settings: ServiceSettings, *, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.db = Database(settings.dsn, settings.reactor_id)
        self.render_client = RenderClient(settings.orchestrator_url)
        self.dispatcher = Dispatcher(
            self.db, self.render_client.render, settings.dispatch, probe=self.render_client.health,
            cache=self.db.cache_take,
        )
        if clock is not None:
            self.dispatcher.clock = clock
        self.listener = Listener(
            settings.dsn,
            on_notice=self._on_notice,
            on_connect=self._on_listener_connect,
            on_log=self._on_log_followed,
            idle_check_s=settings.listener_idle_check_s,
        )
        self.dispatcher.on_cycle = self._on_own_cycle
        self.metrics = Metrics(actor=f"reactor:{settings.reactor_id}")
        self.metrics.watch(listener_connected=lambda: self.listener.connected,
                           listener_reconnects=lambda: self.listener.reconnects,
                           circuit=lambda: (self.dispatcher.circuit.state,
                                            len(self.dispatcher.circuit.transitions)),
                           claims=lambda: (self.dispatcher.stats.claims, self.dispatcher.stats.claims_empty,
                                           self.dispatcher.stats.claim_wakeups))
        # a part that fails is restarted (and counted); one that fails too often stops the reactor
        self.parts = PartSupervisor(settings.restart, on_give_up=self._give_up,
                                    on_restart=self.metrics.part_restarted)
        self.feed: Feed | None = None
        if settings.feed is not None:
            self.feed = self._new_feed(settings.feed)
            self.metrics.watch(feed_seq=lambda: self.feed.last_seq if self.feed is not None else 0)
        self.alerts: Alerts | None = None
        if settings.alerts.enabled:
            self.alerts = Alerts(settings.alerts, AlertStore(self.db.pool), settings.reactor_id,
                                 local_circuit=lambda: self.dispatcher.circuit.state,
                                 listener_connected=lambda: self.listener.connected)
        if self.alerts is not None:
            alerts = self.alerts
            self.metrics.watch(alerts_firing=lambda: alerts.firing, alert_names=ALERT_NAMES)
        self.systemd = Supervisor(Notifier.from_settings(settings.systemd), status=self._systemd_status,
                                  listener_connected=lambda: self.listener.connected,
                                  parts_down=self.parts.down,
                                  feed_address=self._feed_address, listener_grace_s=settings.listener_grace_s)
        self.ready = anyio.Event()
        self.stopping = False
        self._stop_requested = anyio.Event()
        self.sweeper = Sweeper(self.db, every_s=settings.sweep_every_s, min_gap_s=settings.sweep_min_gap_s,
                               grace_s=settings.timeout_grace_s, orphan_s=settings.orphan_after_s,
                               limits_seen=self.dispatcher.limits_seen, want_claim=self.dispatcher.want_claim,
                               recovered=self.metrics.sweep_recovered)
        self.scheduler = Scheduler(self.db, max_sleep_s=settings.schedule_max_sleep_s)

    def _new_feed(self, settings: FeedSettings, old: Feed | None = None) -> Feed:
        feed = Feed(settings, self.settings.dsn, metrics=self.metrics,
                    authenticator=old.auth if old is not None else None,
                    listener_connected=lambda: self.listener.connected,
                    stopping=lambda: self.stopping, parts=self.parts.report)
        # the admin dashboard: its page at /, its requests on the feed (reads through the feed's pool),
        # the runbook's actions for its admins (the web layer does not import ops: they are given here)
        feed.plug(Dashboard(feed.store, RunbookActions(self.settings.dsn)))
        # other reactors' cycles that give nobody work come on reactor_log: heard only while clients watch
        feed.on_clients = self.listener.follow_log
        return feed

    async def _run_feed(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self.feed is not None
        await self.feed.run(task_status=task_status)

    def _renew_feed(self) -> None:
        """Before a restart of the feed: a new Feed (its pool cannot be opened twice) on the same port."""
        old = self.feed
        assert old is not None and self.settings.feed is not None
        self.feed = self._new_feed(replace(self.settings.feed, port=old.port or self.settings.feed.port), old)

    def _renew_dispatcher(self) -> None:
        """Before a restart of the dispatcher: nothing of its last run renders any more (its task group
        cancelled and awaited every render), so no entry in ``inflight`` is live; the restarted run
        puts the jobs they held back at once, without spending a retry. Then re-read the queue."""
        if self.dispatcher.inflight:
            logger.warning("forgetting %d renders of the failed dispatcher (their jobs are put back)",
                           len(self.dispatcher.inflight))
            self.dispatcher.inflight.clear()
        self.dispatcher.on_connect()

    def _give_up(self, failed: PartFailed) -> None:
        logger.error("reactor stopping: %s", failed, extra={"reactor": self.reactor_id, "part": failed.part})
        self.request_stop()

    @property
    def swept_total(self) -> int:
        """Jobs this reactor's sweep took back."""
        return self.sweeper.swept_total

    @property
    def reactor_id(self) -> str:
        return self.settings.reactor_id

    def _on_notice(self, notice: Notice) -> None:
        self.dispatcher.on_notice(notice)
        self.sweeper.on_notice(notice)
        self.scheduler.on_notice(notice)
        if self.feed is not None:
            self.feed.on_notice(notice)
        if self.alerts is not None:
            self.alerts.poke()

    def _on_own_cycle(self) -> None:
        """The dispatcher committed a round trip: its NOTIFY may have gone on reactor_log, which the
        listener follows only while the feed has clients."""
        if self.feed is not None:
            self.feed.wake()
        if self.alerts is not None:
            self.alerts.poke()

    def _on_log_followed(self) -> None:
        if self.feed is not None:
            self.feed.wake()

    def _on_listener_connect(self) -> None:
        self.dispatcher.on_connect()
        if self.feed is not None:
            self.feed.on_connect()
        if self.alerts is not None:
            self.alerts.poke()
        self.sweeper.wake()
        self.scheduler.wake()

    def _systemd_status(self) -> str:
        return describe(stopping=self.stopping, inflight=len(self.dispatcher.inflight),
                        circuit=self.dispatcher.circuit.state,
                        firing=self.alerts.firing if self.alerts is not None else ())

    def _feed_address(self) -> tuple[str, int] | None:
        if self.feed is None or self.feed.port is None:
            return None
        return self.feed.settings.host, self.feed.port

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stop_requested.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.db.open()
        logger.info(
            "reactor starting",
            extra={"reactor": self.reactor_id, "orchestrator": self.settings.orchestrator_url},
        )
        supervise = self.parts.run
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(supervise, Part("dispatcher", self.dispatcher.run,
                                               before_restart=self._renew_dispatcher))
                await tg.start(supervise, Part("listener", self.listener.run))  # each (re)start re-reads
                if self.feed is not None:
                    await tg.start(supervise, Part("feed", self._run_feed, before_restart=self._renew_feed))
                await tg.start(supervise, Part("sweeper", self.sweeper.run))
                await tg.start(supervise, Part("scheduler", self.scheduler.run))
                if self.settings.handle_signals:
                    tg.start_soon(self._signals)
                if self.alerts is not None:
                    await tg.start(supervise, Part("alerts", self.alerts.run, required=False))
                # READY=1 (feed port checked), then WATCHDOG=1; without systemd it returns at once
                if self.systemd.enabled:
                    await tg.start(supervise, Part("systemd", self.systemd.run, required=False))
                else:
                    await tg.start(self.systemd.run)
                self.ready.set()
                task_status.started()
                logger.info("reactor ready", extra={"reactor": self.reactor_id})
                await self._stop_requested.wait()
                self.stopping = True
                self.systemd.stopping(self._systemd_status())
                logger.info("stopping: no new jobs; waiting for renders in flight",
                            extra={"inflight": len(self.dispatcher.inflight)})
                failed = self.parts.gave_up
                if failed is not None and failed.part == "dispatcher":
                    logger.warning("the dispatcher is down: nothing to drain (the sweep takes its jobs back)")
                else:
                    await self.dispatcher.drain()
                tg.cancel_scope.cancel()
            if self.parts.gave_up is not None:
                raise self.parts.gave_up  # `reactor run` exits non-zero: systemd starts a fresh process
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            with anyio.fail_after(5):
                await self.db.unregister()
        except (TimeoutError, DatabaseUnavailable) as exc:
            logger.warning("could not unregister: %s", exc)
        await self.render_client.aclose()
        await self.db.close()
        self.systemd.notifier.close()
        logger.info("reactor stopped", extra={"reactor": self.reactor_id, **vars(self.dispatcher.stats)})

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self._stop_requested.is_set():
                    logger.info("signal %s: draining (send it again to stop at once)", signum.name)
                    self.request_stop()
                else:
                    logger.warning("second signal: aborting renders in flight")
                    self.dispatcher.abort_all()
