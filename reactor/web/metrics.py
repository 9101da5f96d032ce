"""Prometheus metrics of one reactor, in a registry of its own (never the global default).

Conventions: one prefix ``reactor_``, base units (seconds, ratios), ``_total`` on counters, no
per-job or per-user labels. Two kinds of figures:

* fleet-wide state, read from the database at scrape time (every reactor reports the same value:
  aggregate with ``max``, not ``sum``): jobs by status and queued jobs by priority (from
  ``reactor.counters``), the age of the oldest queued job, NOTIFY queue usage, renders saved by
  the render cache in the last hour, and each schedule's next and last run, jobs made and slots
  skipped (``job_schedules``; a label per schedule);
* what this reactor did, counted from the events it reads for the feed, keeping those whose
  ``actor`` is this reactor or its sweep (sum them across reactors): jobs finished by outcome and
  error category, retries, first-attempt wait and per-attempt run times; plus sweep recoveries,
  listener reconnects and feed clients.

Wait time is ``started - created`` of a job's first attempt; run time is from the attempt's start
to the event that ended it (completed, failed, or retrying). Both are read with the event (a join
on the job's row), so they need no hook in the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "RENDER_BUCKETS", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: buckets sized for renders: a tenth of a second to half an hour
RENDER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)

_STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
_PRIORITIES = ("high", "medium", "low")
_CATEGORIES = ("TIMEOUT", "API_ERROR", "INVALID_INPUT", "NOT_FOUND", "UNKNOWN")


class Metrics:
    """The metrics of one reactor. ``actor`` is how its own writes appear in events."""

    def __init__(self, actor: str) -> None:
        self.actor = actor
        self._actors = {actor, f"{actor}:sweep"}  # its dispatcher's writes, and its sweep's
        self.registry = CollectorRegistry()
        r = self.registry
        self.job_wait = Histogram(
            "reactor_job_wait_seconds", "Time from a job's insert to the start of its first attempt "
            "(attempts this reactor started).", buckets=RENDER_BUCKETS, registry=r)
        self.job_run = Histogram(
            "reactor_job_run_seconds", "Duration of attempts this reactor ran, by how they ended.",
            ["outcome"], buckets=RENDER_BUCKETS, registry=r)
        self.jobs_finished = Counter(
            "reactor_jobs_finished", "Jobs this reactor finished, by outcome and error category.",
            ["outcome", "error_category"], registry=r)
        self.retries = Counter(
            "reactor_job_retries", "Failed attempts this reactor put back for a retry, by error category.",
            ["error_category"], registry=r)
        self.sweep_recoveries = Counter(
            "reactor_sweep_recoveries", "Jobs taken back by this reactor's sweep (lease expired, timed out).",
            ["reason"], registry=r)
        self.feed_clients = Gauge(
            "reactor_feed_clients", "Authenticated feed clients connected now.", ["kind"], registry=r)
        self.feed_dropped = Counter(
            "reactor_feed_clients_dropped", "Feed clients closed by the server, by reason.", ["reason"],
            registry=r)
        self.part_restarts = Counter(
            "reactor_part_restarts", "Times a part of this reactor was restarted after it failed unexpectedly.",
            ["part"], registry=r)
        for part in ("dispatcher", "listener", "sweeper", "scheduler"):
            self.part_restarts.labels(part)
        for kind in ("admin", "user"):
            self.feed_clients.labels(kind)
        # start the series at 0, so that rate() sees the first increase
        self.jobs_finished.labels("completed", "none")
        for category in _CATEGORIES:
            self.jobs_finished.labels("failed", category)
        for category in ("TIMEOUT", "API_ERROR", "UNKNOWN"):  # the retried ones
            self.retries.labels(category)
        ProcessCollector(namespace="reactor", registry=r)
        self._live = _LiveCollector()
        r.register(self._live)

    @property
    def actors(self) -> tuple[str, ...]:
        """The ``actor`` of the events this reactor's figures count: its dispatcher's and its sweep's."""
        return tuple(sorted(self._actors))

    # -- what the reactor tells us -----------------------------------------------------------------

    def observe_event(self, ev: Mapping[str, Any]) -> None:
        """One row of ``reactor.events`` with the job's ``created_at`` and ``started_at`` joined."""
        if ev.get("actor") not in self._actors:
            return
        kind = ev.get("kind")
        at = ev.get("at")
        category = ev.get("error_category")
        if kind == "started":
            if ev.get("retry_count") == 0:
                _observe_between(self.job_wait, ev.get("created_at"), at)
        elif kind in ("completed", "failed"):
            _observe_between(self.job_run.labels(kind), ev.get("started_at"), at)
            self.jobs_finished.labels(kind, category or "none").inc()
        elif kind == "retrying" and category:  # without a category: released on drain, not a failure
            _observe_between(self.job_run.labels("retrying"), ev.get("started_at"), at)
            self.retries.labels(category).inc()

    def part_restarted(self, part: str) -> None:
        self.part_restarts.labels(part).inc()

    def sweep_recovered(self, reason: str) -> None:
        self.sweep_recoveries.labels(reason).inc()

    def client_dropped(self, reason: str) -> None:
        self.feed_dropped.labels(reason).inc()

    def watch(
        self, *, listener_connected: Callable[[], bool] | None = None,
        listener_reconnects: Callable[[], int] | None = None,
        circuit: Callable[[], tuple[str, int]] | None = None,
        alerts_firing: Callable[[], Iterable[str]] | None = None,
        alert_names: Iterable[str] = (),
        claims: Callable[[], tuple[int, int, int]] | None = None,
        feed_seq: Callable[[], int] | None = None,
    ) -> None:
        """Figures read from the process at scrape time.

        ``circuit`` gives this reactor's circuit state and how many transitions it made;
        ``alerts_firing`` the alerts firing as of this reactor's last evaluation; ``claims`` this
        reactor's claims, those that found nothing, and the notifications that asked it to claim;
        ``feed_seq`` the last event seq its feed has read.
        """
        if listener_connected is not None:
            self._live.listener_connected = listener_connected
        if listener_reconnects is not None:
            self._live.listener_reconnects = listener_reconnects
        if circuit is not None:
            self._live.circuit = circuit
        if alerts_firing is not None:
            self._live.alerts_firing = alerts_firing
            self._live.alert_names = tuple(alert_names)
        if claims is not None:
            self._live.claims = claims
        if feed_seq is not None:
            self._live.feed_seq = feed_seq

    def update_database(self, row: Mapping[str, Any] | None) -> None:
        """The database figures of this scrape (``feed_metrics`` of sql/feed.sql), None if unreadable."""
        self._live.db = dict(row) if row is not None else None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self) -> None:
        self.db: dict[str, Any] | None = None
        self.listener_connected: Callable[[], bool] | None = None
        self.listener_reconnects: Callable[[], int] | None = None
        self.circuit: Callable[[], tuple[str, int]] | None = None
        self.alerts_firing: Callable[[], Iterable[str]] | None = None
        self.alert_names: tuple[str, ...] = ()
        self.claims: Callable[[], tuple[int, int, int]] | None = None
        self.feed_seq: Callable[[], int] | None = None

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("reactor_database_up", "1 if the last scrape could read the database.")
        up.add_metric([], 1.0 if self.db is not None else 0.0)
        yield up
        if self.db is not None:
            db = self.db
            jobs = GaugeMetricFamily("reactor_jobs", "Jobs by status (fleet-wide).", labels=["status"])
            for status in _STATUSES:
                jobs.add_metric([status], float(db.get(status) or 0))
            yield jobs
            queued = GaugeMetricFamily(
                "reactor_queued_jobs", "Queued jobs by priority (fleet-wide).", labels=["priority"])
            for priority in _PRIORITIES:
                queued.add_metric([priority], float(db.get(f"queued_{priority}") or 0))
            yield queued
            age = GaugeMetricFamily(
                "reactor_oldest_queued_age_seconds", "Age of the oldest queued job; 0 when none is queued.")
            age.add_metric([], float(db.get("oldest_queued_age_seconds") or 0.0))
            yield age
            usage = GaugeMetricFamily(
                "reactor_notification_queue_usage_ratio", "pg_notification_queue_usage(): how full "
                "PostgreSQL's NOTIFY queue is (0 to 1).")
            usage.add_metric([], float(db.get("notification_queue_usage") or 0.0))
            yield usage
            saved = GaugeMetricFamily(
                "reactor_renders_saved_last_hour", "Jobs completed from the render cache in the last hour, "
                "without a render call of their own (fleet-wide; get_queue_stats().renders_saved).")
            saved.add_metric([], float(db.get("renders_saved_last_hour") or 0))
            yield saved
            yield from _schedule_metrics(db.get("schedules"))
        if self.listener_connected is not None:
            connected = GaugeMetricFamily("reactor_listener_connected", "1 while the LISTEN connection is up.")
            connected.add_metric([], 1.0 if self.listener_connected() else 0.0)
            yield connected
        if self.listener_reconnects is not None:
            reconnects = CounterMetricFamily(
                "reactor_listener_reconnects", "Times the LISTEN connection was re-established.")
            reconnects.add_metric([], float(self.listener_reconnects()))
            yield reconnects
        if self.circuit is not None:
            state, transitions = self.circuit()
            open_ = GaugeMetricFamily(
                "reactor_circuit_open", "1 while this reactor's circuit to the orchestrator is open or half-open.")
            open_.add_metric([], 0.0 if state == "closed" else 1.0)
            yield open_
            states = GaugeMetricFamily(
                "reactor_circuit_state", "This reactor's circuit state (1 for the current one).", labels=["state"])
            for name in ("closed", "open", "half_open"):
                states.add_metric([name], 1.0 if state == name else 0.0)
            yield states
            moved = CounterMetricFamily(
                "reactor_circuit_transitions", "Circuit state changes of this reactor.")
            moved.add_metric([], float(transitions))
            yield moved
        if self.alerts_firing is not None:
            firing = set(self.alerts_firing())
            alerts = GaugeMetricFamily(
                "reactor_alerts_firing", "1 for each alert firing (as of this reactor's last evaluation).",
                labels=["alert"])
            for name in sorted(set(self.alert_names) | firing):
                alerts.add_metric([name], 1.0 if name in firing else 0.0)
            yield alerts
        if self.claims is not None:
            claims, empty, wakeups = self.claims()
            claimed = CounterMetricFamily(
                "reactor_claims", "Claims this reactor made, by whether they found jobs.", labels=["result"])
            claimed.add_metric(["jobs"], float(claims - empty))
            claimed.add_metric(["empty"], float(empty))
            yield claimed
            woken = CounterMetricFamily(
                "reactor_claim_wakeups", "Notifications from others that asked this reactor to claim.")
            woken.add_metric([], float(wakeups))
            yield woken
        if self.feed_seq is not None:
            seq = GaugeMetricFamily("reactor_feed_seq", "The last event seq this reactor's feed has read.")
            seq.add_metric([], float(self.feed_seq()))
            yield seq


def _schedule_metrics(rows: object) -> Iterable[Metric]:
    """The schedules' figures (a list of objects, as ``feed_metrics`` reads them)."""
    schedules = [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)] \
        if isinstance(rows, list) else []
    enabled = GaugeMetricFamily("reactor_schedule_enabled", "1 for each enabled schedule (fleet-wide).",
                                labels=["schedule"])
    next_run = GaugeMetricFamily(
        "reactor_schedule_next_run_timestamp_seconds", "Next slot of each enabled schedule, Unix time.",
        labels=["schedule"])
    last_run = GaugeMetricFamily(
        "reactor_schedule_last_run_timestamp_seconds", "Slot (or run-now time) of the last job each schedule "
        "made, Unix time.", labels=["schedule"])
    made = CounterMetricFamily("reactor_schedule_jobs_created", "Jobs each schedule made (fleet-wide).",
                               labels=["schedule"])
    skipped = CounterMetricFamily(
        "reactor_schedule_slots_skipped", "Slots each schedule skipped under its catch_up (fleet-wide).",
        labels=["schedule"])
    for s in schedules:
        name = [s["name"]]
        enabled.add_metric(name, 1.0 if s.get("enabled") else 0.0)
        if isinstance(s.get("next_run_at"), int | float):
            next_run.add_metric(name, float(s["next_run_at"]))
        if isinstance(s.get("last_run_at"), int | float):
            last_run.add_metric(name, float(s["last_run_at"]))
        made.add_metric(name, float(s.get("jobs_created") or 0))
        skipped.add_metric(name, float(s.get("slots_skipped") or 0))
    yield from (enabled, next_run, last_run, made, skipped)


def _observe_between(target: Histogram, start: object, end: object) -> None:
    if isinstance(start, datetime) and isinstance(end, datetime) and end >= start:
        target.observe((end - start).total_seconds())
