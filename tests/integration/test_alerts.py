"""Alerts: evaluated by every reactor, each transition logged, NOTIFYed and posted exactly once.

The webhook is a tiny HTTP server on a thread of the test that answers with scripted status codes
and records every POST.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from reactor.core.environment import Environment
from reactor.core.errors import ConfigError
from reactor.db.alerts import AlertStore
from reactor.db.store import connect_kwargs
from reactor.ops.alerts import ALERTS, Alerts, AlertSettings, Figures, decide, measure, settings_from
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import FAST_DISPATCH, running_service, wait_for

pytestmark = pytest.mark.anyio

PATIENCE_S = 60.0
FAST_ALERTS = AlertSettings(every_s=0.2, webhook_backoff_s=0.1, webhook_backoff_cap_s=0.5, webhook_timeout_s=5.0)


# -- helpers ----------------------------------------------------------------------------------------


class Hook:
    """A webhook receiver: answers each POST with the next scripted status (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.posts: list[tuple[int, dict[str, Any]]] = []  # (status answered, JSON body)
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook._lock:
                    status = hook.statuses.pop(0) if hook.statuses else 200
                    hook.posts.append((status, body))
                data = b"ok" if status == 200 else b"boom"
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret"

    def delivered(self, alert: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [b for s, b in self.posts if s == 200 and (alert is None or b["alert"] == alert)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def webhook(statuses: list[int] | None = None) -> Iterator[Hook]:
    hook = Hook(statuses)
    try:
        yield hook
    finally:
        hook.close()


@asynccontextmanager
async def reactor(dsn: str, orchestrator_url: str, alerts: AlertSettings, reactor_id: str) -> AsyncIterator[Service]:
    settings = ServiceSettings(dsn=dsn, orchestrator_url=orchestrator_url, dispatch=FAST_DISPATCH,
                               handle_signals=False, alerts=alerts, reactor_id=reactor_id)
    async with running_service(Service(settings)) as service:
        yield service


async def until(what: str, pred: Callable[[], bool], timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


@asynccontextmanager
async def alert_notices(dsn: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Collect NOTIFY reactor_alerts payloads while the block runs."""
    got: list[dict[str, Any]] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("LISTEN reactor_alerts")

        async def collect() -> None:
            async for n in conn.notifies():
                got.append(json.loads(n.payload))

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            try:
                yield got
            finally:
                tg.cancel_scope.cancel()


def insert_jobs(db: psycopg.Connection[Any], n: int) -> None:
    for i in range(n):
        db.execute("INSERT INTO jobs (job_type, payload) VALUES ('doubt', %s)",
                   (json.dumps({"question": f"alert test {i}"}),))


def alert_records(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "reactor.ops.alerts" and r.getMessage().startswith(("alert firing: " + name,
                                                                          "alert resolved: " + name))]


# -- the rules ------------------------------------------------------------------------------------


def test_hysteresis_fires_above_and_resolves_at_80_percent() -> None:
    assert decide(False, 50, 50) is False and decide(False, 51, 50) is True
    assert decide(True, 41, 50) is True, "between 80 % and the threshold it stays firing"
    assert decide(True, 40, 50) is False
    assert decide(False, 1, 0) is True and decide(True, 0, 0) is False  # threshold 0: any value fires
    m = measure(Figures(queued=7, failed_last_hour=2, avg_wait_s=61.26, oldest_queued_age_s=None,
                        open_circuits=1, open_circuit_s=301.0, alert_queue_depth=3,
                        alert_avg_wait_minutes=2), circuit_open_s=300)
    assert m == {"queue_depth": (7.0, 3.0), "failed_per_hour": (2.0, 10.0), "avg_wait": (61.3, 120.0),
                 "oldest_queued": (0.0, 120.0), "render_farm_unreachable": (301.0, 300.0)}
    assert list(m) == list(ALERTS)


def test_webhook_setting_comes_from_the_option_or_the_environment() -> None:
    hook = Environment.read({"REACTOR_ALERT_WEBHOOK": "https://hooks.example/x"})
    assert settings_from(None, Environment.read({})).webhook_url is None
    assert settings_from(None, hook).webhook_url == "https://hooks.example/x"
    assert settings_from("http://a:1/b", hook).webhook_url == "http://a:1/b"
    with pytest.raises(ConfigError, match="--alert-webhook"):
        settings_from("hooks.example/x", Environment.read({}))


# -- end to end -----------------------------------------------------------------------------------


async def test_queue_depth_fires_while_paused_and_resolves_on_resume_once_each(
    dsn: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reactor.ops.alerts")
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0, alert_queue_depth = 3")
    with webhook() as hook:
        async with (
            alert_notices(dsn) as notices,
            OrchestratorDouble() as orch,
            reactor(dsn, orch.url, replace(FAST_ALERTS, webhook_url=hook.url), "alerts-a") as service,
        ):
            insert_jobs(db, 5)
            await until("the firing post", lambda: len(hook.delivered()) >= 1)
            [fired] = hook.delivered()
            assert fired["alert"] == "queue_depth" and fired["status"] == "firing"
            assert (fired["value"], fired["threshold"], fired["reactor"]) == (5, 3, "alerts-a")
            assert fired["text"].startswith(":rotating_light: *FIRING*") and "5 jobs queued" in fired["text"]
            row = db.execute("SELECT firing, value, threshold, changed_by FROM reactor.alerts "
                             "WHERE name = 'queue_depth'").fetchone()
            assert row == (True, 5, 3, "alerts-a")
            assert service.alerts is not None and service.alerts.firing == ("queue_depth",)

            db.execute("UPDATE job_queue_config SET max_concurrent_renders = 10")  # resume
            await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'",
                           expect=lambda n: n == 5, timeout=PATIENCE_S)
            await until("the resolved post", lambda: len(hook.delivered()) >= 2)
            await anyio.sleep(1.5)  # several more evaluations: nothing else is sent
        resolved = hook.delivered()[1]
        assert resolved["status"] == "resolved" and resolved["alert"] == "queue_depth"
        assert resolved["fired_at"] == fired["since"]
        assert resolved["text"].startswith(":white_check_mark: *RESOLVED*")
        assert [(s, b["status"]) for s, b in hook.posts] == [(200, "firing"), (200, "resolved")]
        assert [(n["alert"], n["status"]) for n in notices] == [("queue_depth", "firing"),
                                                               ("queue_depth", "resolved")]
        assert set(notices[0]) == {"alert", "status", "value", "threshold", "since", "reactor", "summary"}
        assert len(alert_records(caplog, "queue_depth")) == 2


async def test_two_reactors_send_each_transition_once(
    dsn: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reactor.ops.alerts")
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0, alert_queue_depth = 3")
    racing = replace(FAST_ALERTS, every_s=0.05)
    with webhook() as hook:
        async with (
            alert_notices(dsn) as notices,
            OrchestratorDouble() as orch,
            reactor(dsn, orch.url, replace(racing, webhook_url=hook.url), "alerts-a") as a,
            reactor(dsn, orch.url, replace(racing, webhook_url=hook.url), "alerts-b") as b,
        ):
            insert_jobs(db, 6)
            await until("the firing post", lambda: len(hook.delivered()) >= 1)
            await anyio.sleep(1.0)  # both go on evaluating the firing alert, every 50 ms or so
            db.execute("UPDATE job_queue_config SET max_concurrent_renders = 10")
            await until("the resolved post", lambda: len(hook.delivered()) >= 2)
            await anyio.sleep(1.5)
            assert a.alerts is not None and b.alerts is not None
            evaluations = (a.alerts.last.evaluations, b.alerts.last.evaluations)
            made = a.alerts.transitions + b.alerts.transitions
        assert [(s, x["alert"], x["status"]) for s, x in hook.posts] == [
            (200, "queue_depth", "firing"), (200, "queue_depth", "resolved")]
        assert sorted((t.name, t.status) for t in made) == [("queue_depth", "firing"), ("queue_depth", "resolved")]
        assert [(n["alert"], n["status"]) for n in notices] == [("queue_depth", "firing"),
                                                               ("queue_depth", "resolved")]
        assert len(alert_records(caplog, "queue_depth")) == 2
        assert min(evaluations) >= 3, f"both reactors should have evaluated repeatedly: {evaluations}"


async def test_a_failing_webhook_is_retried_and_delivered_once(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0, alert_queue_depth = 3")
    with webhook(statuses=[500, 500]) as hook:
        async with (
            OrchestratorDouble() as orch,
            reactor(dsn, orch.url, replace(FAST_ALERTS, webhook_url=hook.url), "alerts-a") as service,
        ):
            insert_jobs(db, 4)
            await until("the firing post", lambda: len(hook.delivered()) >= 1)
            await anyio.sleep(1.5)
            assert service.alerts is not None and service.alerts.webhook is not None
            assert (service.alerts.webhook.delivered, service.alerts.webhook.abandoned) == (1, 0)
        assert [(s, b["alert"], b["status"]) for s, b in hook.posts] == [
            (500, "queue_depth", "firing"), (500, "queue_depth", "firing"), (200, "queue_depth", "firing")]


async def test_a_refusing_webhook_is_not_retried(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0, alert_queue_depth = 0")
    with webhook(statuses=[404]) as hook:
        async with (
            OrchestratorDouble() as orch,
            reactor(dsn, orch.url, replace(FAST_ALERTS, webhook_url=hook.url), "alerts-a") as service,
        ):
            insert_jobs(db, 1)
            assert service.alerts is not None and service.alerts.webhook is not None
            webhook_ = service.alerts.webhook
            await until("the refusal", lambda: webhook_.abandoned == 1)
            await anyio.sleep(1.0)
        assert [s for s, _ in hook.posts] == [404]


# -- the evaluator alone --------------------------------------------------------------------------


@asynccontextmanager
async def pool(dsn: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, max_size=2, kwargs=connect_kwargs(),
                                                      open=False)
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


async def test_render_farm_unreachable_counts_live_reactors_only(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("INSERT INTO reactor.reactors (id, hostname, pid, version, circuit_state, circuit_since) VALUES "
               "('live', 'h', 1, '0', 'open', now() - interval '6 minutes'), "
               "('young', 'h', 2, '0', 'half_open', now() - interval '1 minute')")
    db.execute("INSERT INTO reactor.reactors (id, hostname, pid, version, circuit_state, circuit_since, "
               "heartbeat_at) VALUES ('dead', 'h', 3, '0', 'open', now() - interval '1 hour', "
               "now() - interval '10 minutes')")
    async with pool(dsn) as p:
        alerts = Alerts(AlertSettings(), AlertStore(p), "evaluator")
        [t] = await alerts.evaluate() or []
        assert (t.name, t.status) == ("render_farm_unreachable", "firing")
        assert 360 <= t.value < 400 and t.threshold == 300
        assert "circuit open on 2 reactors for 6 min" in t.summary
        assert await alerts.evaluate() == []  # still firing: nothing new to say
        assert not alerts.may_skip()

        # 'live' closes; 'young' has been open for a minute, below 80 % of 300 s: resolved
        db.execute("UPDATE reactor.reactors SET circuit_state = 'closed', circuit_since = NULL "
                   "WHERE id = 'live'")
        [t] = await alerts.evaluate() or []
        assert (t.name, t.status) == ("render_farm_unreachable", "resolved")
        assert "circuit open on 1 reactor for 60 s" in t.summary and t.fired_at is not None
    assert db.execute("SELECT firing FROM reactor.alerts WHERE name = 'render_farm_unreachable'").fetchone() == (
        False,)


async def test_an_idle_fleet_skips_evaluations_until_something_happens(
    dsn: str, db: psycopg.Connection[Any],
) -> None:
    async with pool(dsn) as p:
        alerts = Alerts(AlertSettings(), AlertStore(p), "evaluator")
        assert not alerts.may_skip(), "the first evaluation always runs"
        assert await alerts.evaluate() == []
        assert alerts.may_skip(), "nothing queued, firing or open: the next rounds cost nothing"
        alerts.poke()  # a job event, a config change or a reconnect
        assert not alerts.may_skip()
        insert_jobs(db, 1)
        assert await alerts.evaluate() == []
        assert not alerts.may_skip(), "a queued job ages: keep looking"
        # another evaluator holds the lock: this one skips the round, and looks again next time
        with psycopg.connect(dsn) as other:
            other.execute("SELECT pg_advisory_xact_lock(7240513003)")
            assert await alerts.evaluate() is None
            other.rollback()
        assert alerts.last.not_leader == 1 and not alerts.may_skip()
