"""A part that fails is restarted, reported on /readyz, and given up on only when it cannot recover.

Real PostgreSQL, the orchestrator double over HTTP, a real Service (or a real ``reactor run``
process); the failures are injected into the running parts, the database is never mocked.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from reactor.core.notice import Notice
from reactor.engine.supervise import PartFailed, RestartPolicy, describe_error
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from reactor.web.auth import AuthSettings
from reactor.web.feed import FeedSettings
from tests.support.processes import PATIENCE_S, jobs_state, reactor_process, until
from tests.support.reactors import FAST_DISPATCH, running_service, wait_for

pytestmark = pytest.mark.anyio

Conn = psycopg.Connection[Any]

FEED_SECRET = "supervise-tests-secret-0123456789abcdef"


def insert(db: Conn, topic: str = "Photosynthesis") -> str:
    row = db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', %s) RETURNING id",
                     (json.dumps({"topic": topic}),)).fetchone()
    assert row
    return str(row[0])


def settings(dsn: str, orchestrator_url: str, restart: RestartPolicy, *, feed: bool = False) -> ServiceSettings:
    return ServiceSettings(
        dsn=dsn, orchestrator_url=orchestrator_url, dispatch=FAST_DISPATCH, handle_signals=False,
        # no periodic sweep: a job is picked up because a NOTIFY (or a resync) says so
        sweep_every_s=600.0, restart=restart,
        feed=FeedSettings(auth=AuthSettings(jwt_secret=FEED_SECRET),
                          close_timeout_s=1.0) if feed else None,
    )


def failures_logged(caplog: pytest.LogCaptureFixture, part: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "reactor.engine.supervise" and r.getMessage().startswith(f"{part} failed")]


async def test_a_failed_listener_is_restarted_and_readyz_says_so(
        dsn: str, db: Conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reactor")
    # the restart waits 4 to 8 s: time enough to see the listener down, even on a slow machine
    restart = RestartPolicy(base_s=8.0, cap_s=8.0)
    async with OrchestratorDouble() as orch, \
            running_service(Service(settings(dsn, orch.url, restart, feed=True))) as svc:
        assert svc.feed is not None
        base = f"http://127.0.0.1:{svc.feed.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["parts"]["listener"] == "running"

            # the listener's task raises: its on_notice callback fails once, on the next notification
            listener = svc.listener
            forward = listener._on_notice
            injected: list[Notice] = []

            def fail_once(notice: Notice) -> None:
                if not injected:
                    injected.append(notice)
                    raise ValueError("injected: a notification nobody expected")
                forward(notice)

            listener._on_notice = fail_once
            swallowed = insert(db, "swallowed with the failure")

            body: dict[str, Any] = {}

            async def listener_down() -> bool:
                nonlocal body
                resp = await http.get("/readyz")
                body = resp.json()
                return resp.status_code == 503 and body["parts"]["listener"].startswith("restarting")

            for _ in range(int(PATIENCE_S / 0.05)):
                if await listener_down():
                    break
                await anyio.sleep(0.05)
            assert body["ready"] is False and body["listener"] == "disconnected", body
            assert body["parts"]["listener"] == (
                "restarting: ValueError: injected: a notification nobody expected (1 restart)"), body
            assert body["parts"]["dispatcher"] == "running" and body["stopping"] is False, body
            assert (await http.get("/livez")).status_code == 200
            assert not svc.stopping and svc.parts.gave_up is None  # the service runs on

            # the restart: LISTEN again, and the queue re-read (the swallowed job's notice was lost)
            ready_again = False
            for _ in range(int(PATIENCE_S / 0.1)):
                resp = await http.get("/readyz")
                if resp.status_code == 200:
                    ready_again = True
                    break
                await anyio.sleep(0.1)
            assert ready_again, resp.text
            assert resp.json()["parts"]["listener"] == "running" and svc.listener.connected
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (swallowed,),
                           expect=lambda s: s == "completed", timeout=PATIENCE_S)

            # NOTIFY works again: with the sweep asleep, only a notification can start this job
            after = insert(db, "inserted after the restart")
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (after,),
                           expect=lambda s: s == "completed", timeout=PATIENCE_S)

            metrics = (await http.get("/metrics")).text
            restarts = {s.labels["part"]: s.value for f in text_string_to_metric_families(metrics)
                        for s in f.samples if s.name == "reactor_part_restarts_total"}
            assert restarts["listener"] == 1 and restarts["dispatcher"] == 0 and restarts["sweeper"] == 0

    [logged] = failures_logged(caplog, "listener")  # once, with the traceback
    assert logged.levelno == logging.ERROR and logged.exc_info is not None and logged.exc_info[0] is ValueError
    assert getattr(logged, "restarts", None) == 1


async def test_a_failed_dispatcher_is_restarted_and_loses_no_job(
        dsn: str, db: Conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reactor")
    restart = RestartPolicy(base_s=0.5, cap_s=0.5)
    async with OrchestratorDouble() as orch, running_service(Service(settings(dsn, orch.url, restart))) as svc:
        slow = insert(db, "[[latency=4000]] held when the dispatcher fails")
        await until(lambda: orch.stats()["in_flight"] == 1, "the render to start", timeout=PATIENCE_S)

        # a bug in one of the dispatcher's own decisions (every per-job and database error is caught
        # below it): its loop raises
        budget = svc.dispatcher.circuit.claim_budget
        calls = 0

        def budget_fails_once() -> int | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected: the claim budget broke")
            return budget()

        svc.dispatcher.circuit.claim_budget = budget_fails_once  # type: ignore[method-assign]
        svc.dispatcher.want_claim()
        await until(lambda: svc.parts.restarts("dispatcher") == 1, "the dispatcher to fail", timeout=PATIENCE_S)
        await until(lambda: svc.parts.states()["dispatcher"] == "running", "its restart", timeout=PATIENCE_S)
        assert not svc.stopping and svc.parts.states()["listener"] == "running"
        # its render was cancelled with it; the restarted dispatcher puts the job back at once (no
        # retry spent, no lease to wait for) and renders it: not lost, never rendered twice at once
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (slow,), expect=lambda s: s == "completed",
                       timeout=PATIENCE_S)
        fresh = insert(db, "inserted after the restart")
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (fresh,), expect=lambda s: s == "completed",
                       timeout=PATIENCE_S)
        stats = orch.stats()
        assert stats["max_in_flight"] == 1, stats
        assert [r["job_id"] for r in orch.requests].count(slow) == 2  # the cancelled attempt, then the one that ran
        assert db.execute("SELECT retry_count, attempt FROM jobs WHERE id = %s", (slow,)).fetchone() == (0, 2)
    kinds = [r[0] for r in db.execute("SELECT kind FROM job_events WHERE job_id = %s ORDER BY seq", (slow,))]
    assert kinds == ["inserted", "started", "retrying", "started", "completed"], jobs_state(db)
    [logged] = failures_logged(caplog, "dispatcher")
    assert logged.exc_info is not None and logged.exc_info[1] is not None
    assert describe_error(logged.exc_info[1]) == "RuntimeError: injected: the claim budget broke"


async def test_a_failed_feed_is_restarted_on_the_same_port(dsn: str, db: Conn) -> None:
    restart = RestartPolicy(base_s=0.5, cap_s=0.5)
    async with OrchestratorDouble() as orch, \
            running_service(Service(settings(dsn, orch.url, restart, feed=True))) as svc:
        old = svc.feed
        assert old is not None and old.port is not None
        port = old.port
        # the feed's pump raises on its next read of the events (with no client: of the log's end)
        rows = old.store.rows

        async def events_fail(name: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            if name in ("feed_events", "feed_follow"):
                raise RuntimeError("injected: the pump broke")
            return await rows(name, *args, **kwargs)

        old.store.rows = events_fail  # type: ignore[method-assign]
        insert(db)  # a notification wakes the pump
        await until(lambda: svc.parts.restarts("feed") == 1 and svc.parts.states()["feed"] == "running",
                    "the feed to be restarted", timeout=PATIENCE_S)
        new = svc.feed
        assert new is not None and new is not old and new.port == port  # a new Feed (a pool opens once), same port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            resp = await http.get("/readyz")
            assert resp.status_code == 200, resp.text
            assert resp.json()["parts"]["feed"] == "running"
            token = jwt.encode({"role": "service_role", "exp": int(time.time()) + 600},
                               FEED_SECRET, algorithm="HS256")
        async with connect(f"ws://127.0.0.1:{port}/feed", additional_headers={"Authorization": f"Bearer {token}"}
                           ) as ws:
            with anyio.fail_after(PATIENCE_S):
                first = json.loads(await ws.recv())
            assert first["type"] == "snapshot"


async def test_a_part_that_keeps_failing_stops_the_service(
        dsn: str, db: Conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reactor")
    restart = RestartPolicy(base_s=0.05, cap_s=0.05, give_up_after=3, window_s=60.0)
    async with OrchestratorDouble() as orch:
        svc = Service(settings(dsn, orch.url, restart))
        sweeps = 0

        async def sweep_fails(grace_s: float, orphan_s: float) -> Any:
            nonlocal sweeps
            sweeps += 1
            raise RuntimeError(f"injected: sweep {sweeps} broke")

        svc.db.sweep = sweep_fails  # type: ignore[method-assign]
        with anyio.fail_after(PATIENCE_S), pytest.raises(PartFailed) as failed:
            await svc.run()
    assert failed.value.part == "sweeper" and sweeps == 3
    assert str(failed.value) == (
        "sweeper failed 3 times within 60 s, giving up (last: RuntimeError: injected: sweep 3 broke)")
    assert svc.stopping and svc.ready.is_set()
    assert svc.parts.states()["sweeper"] == "failed: RuntimeError: injected: sweep 3 broke"
    # it stopped the ordinary way: unregistered, and said why
    assert db.execute("SELECT count(*) FROM reactor.reactors WHERE id = %s", (svc.reactor_id,)).fetchone() == (0,)
    messages = [r.getMessage() for r in caplog.records]
    assert f"reactor stopping: {failed.value}" in messages and "reactor stopped" in messages


async def test_reactor_run_exits_non_zero_when_a_part_cannot_recover(dsn: str, db: Conn, tmp_path: Path) -> None:
    # a schema broken by hand: every sweep fails, and no restart can fix it
    db.execute("DROP FUNCTION reactor.sweep(interval, interval, timestamptz)")
    async with OrchestratorDouble() as orch:
        with reactor_process(dsn, orch.url, tmp_path, "gives-up") as rp:
            await rp.wait_ready()
            job = insert(db)  # the rest still works meanwhile
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (job,), expect=lambda s: s == "completed",
                           timeout=PATIENCE_S)
            rc = await rp.wait_exit(timeout=PATIENCE_S)
            log = rp.log(10**6)
    assert rc == 2, rp.diag()
    assert "sweeper failed unexpectedly: restart 1" in log and "UndefinedFunction" in log, rp.diag()
    assert "sweeper failed 5 times within 60 s: giving up, the reactor stops" in log, rp.diag()
    assert "reactor: sweeper failed 5 times within 60 s, giving up" in log, rp.diag()  # the CLI's last word
