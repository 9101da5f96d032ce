"""The live feed: real websocket clients against a real reactor (real PostgreSQL, real HTTP)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import httpx
import jwt
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import migrate_up
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble
from reactor.web import wire
from reactor.web.auth import AuthSettings
from reactor.web.feed import FeedSettings
from tests.support.processes import PATIENCE_S, until
from tests.support.reactors import FAST_DISPATCH, running_reactor, running_service, wait_for

pytestmark = pytest.mark.anyio

SECRET = "feed-tests-shared-secret-0123456789abcdef"
USER_A = str(uuid.UUID(int=0xA))
USER_B = str(uuid.UUID(int=0xB))

FEED = FeedSettings(
    auth=AuthSettings(jwt_secret=SECRET), auth_timeout_s=1.0, heartbeat_s=0.5, stats_interval_s=0.2,
    position_interval_s=0.05, close_timeout_s=1.0,
)


def token(role: str = "service_role", sub: str | None = None, exp_in: float = 3600, **claims: Any) -> str:
    body: dict[str, Any] = {"role": role, "exp": int(time.time() + exp_in), **claims}
    if sub is not None:
        body["sub"] = sub
    return jwt.encode(body, SECRET, algorithm="HS256")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def feed_reactor(dsn: str, orchestrator_url: str, *, reactor_id: str | None = None,
                       **feed: Any) -> AsyncIterator[Service]:
    settings = ServiceSettings(
        dsn=dsn, orchestrator_url=orchestrator_url, dispatch=FAST_DISPATCH, handle_signals=False,
        feed=replace(FEED, **feed),
    )
    if reactor_id:
        settings = replace(settings, reactor_id=reactor_id)
    async with running_service(Service(settings)) as service:
        yield service


def url(service: Service, query: str = "") -> str:
    assert service.feed is not None
    return service.feed.url + query


def http_base(service: Service) -> str:
    assert service.feed is not None
    return f"http://127.0.0.1:{service.feed.port}"


async def recv(ws: ClientConnection, timeout: float = 15.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        msg: dict[str, Any] = json.loads(await ws.recv())
    return msg


async def recv_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool],
                     timeout: float = 20.0) -> list[dict[str, Any]]:
    """Messages up to and including the first for which ``done`` holds."""
    got: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while True:
            msg = json.loads(await ws.recv())
            got.append(msg)
            if done(msg):
                return got


async def closed_with(ws: ClientConnection, timeout: float = 15.0) -> tuple[int | None, str, list[Any]]:
    """Read until the server closes: (code, reason, what was received before)."""
    got: list[Any] = []
    with anyio.fail_after(timeout):
        try:
            while True:
                got.append(await ws.recv())
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else ""), got


def events(msgs: list[dict[str, Any]], job_id: str | None = None) -> list[dict[str, Any]]:
    return [m for m in msgs if m["type"] == "event" and (job_id is None or m["job"]["id"] == job_id)]


def is_event(seq: int) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["type"] == "event" and m["seq"] == seq


def insert(db: psycopg.Connection[Any], *, user: str | None = None, topic: str = "t",
           priority: str = "medium") -> str:
    row = db.execute(
        "INSERT INTO jobs (job_type, priority, user_id, payload) VALUES ('topic_short', %s, %s, %s) RETURNING id",
        (priority, user, json.dumps({"topic": topic})),
    ).fetchone()
    assert row
    return str(row[0])


def last_seq(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT last_seq FROM reactor.counters").fetchone()
    assert row
    return int(row[0])


async def test_admin_gets_snapshot_then_events_in_order(dsn: str, db: psycopg.Connection[Any]) -> None:
    before = insert(db, topic="[[latency=100]] first")
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (before,), expect=lambda s: s == "completed")
        async with connect(url(svc), additional_headers=bearer(token())) as ws:
            snap = await recv(ws)
            assert snap["type"] == "snapshot"
            assert snap["seq"] == last_seq(db)
            assert snap["stats"]["completed"] == 1 and snap["stats"]["last_seq"] == snap["seq"]
            assert [j["id"] for j in snap["jobs"]] == [before]
            assert snap["jobs"][0]["video_url"].endswith(f"/videos/{before}.mp4")
            assert snap["queue"] == []
            job_id = insert(db, user=USER_A, topic="[[latency=50]] second")
            msgs = await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["status"] == "completed")
            mine = events(msgs, job_id)
            assert [e["kind"] for e in mine] == ["inserted", "started", "completed"]
            seqs = [e["seq"] for e in events(msgs)]
            assert seqs == list(range(snap["seq"] + 1, snap["seq"] + 1 + len(seqs)))
            done = mine[-1]["job"]
            assert done["user_id"] == USER_A and done["job_type"] == "topic_short" and done["retry_count"] == 0
            assert done["video_url"].endswith(f"/videos/{job_id}.mp4")
            assert mine[-1]["actor"] == f"reactor:{svc.reactor_id}"
            # coalesced stats (never ahead of the events) and heartbeats carrying the last seq
            later = await recv_until(ws, lambda m: m["type"] == "heartbeat")
            stats = [m for m in msgs + later if m["type"] == "stats"]
            assert stats and stats[-1]["seq"] <= seqs[-1]
            assert later[-1]["seq"] == seqs[-1]


async def test_user_sees_only_own_jobs_and_live_positions(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # paused: build a queue first
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        async with connect(url(svc)) as a, connect(url(svc), additional_headers=bearer(
                token("authenticated", USER_B))) as b:
            await a.send(json.dumps({"type": "auth", "token": token("authenticated", USER_A)}))  # browser style
            snap_a, snap_b = await recv(a), await recv(b)
            assert snap_a["type"] == snap_b["type"] == "snapshot"
            assert snap_a["stats"] is None and snap_a["jobs"] == [] and snap_a["queue"] == []
            b_jobs = [insert(db, user=USER_B, topic=f"[[latency=400]] b{i}") for i in range(2)]  # not one render
            a_job = insert(db, user=USER_A, topic="[[latency=50]] a")
            got_a = await recv_until(a, lambda m: m.get("type") == "position")
            assert events(got_a)[0]["job"]["id"] == a_job
            assert got_a[-1] == {"type": "position", "job_id": a_job, "queue_position": 3}
            db.execute("UPDATE job_queue_config SET max_concurrent_renders = 1")
            more = await recv_until(a, lambda m: m["type"] == "event" and m["job"]["status"] == "completed")
            got_a += more
            positions = [m["queue_position"] for m in got_a if m["type"] == "position"]
            # 3, 2, 1 as B's jobs start ahead of it (a stalled machine may merge two steps)
            assert positions[0] == 3 and positions[-1] == 1
            assert positions == sorted(set(positions), reverse=True)
            assert [e["kind"] for e in events(got_a)] == ["inserted", "started", "completed"]
            got_b = await recv_until(b, lambda m: m["type"] == "event" and m["job"]["id"] == b_jobs[1]
                                     and m["job"]["status"] == "completed")
        # A never saw anything of B's, nor B of A's
        text_a = json.dumps(got_a)
        assert USER_B not in text_a and not any(j in text_a for j in b_jobs)
        assert all(m["type"] in ("event", "position", "heartbeat") for m in got_a)
        assert all("actor" not in m for m in events(got_a))
        assert {e["job"]["id"] for e in events(got_b)} == set(b_jobs)
        assert a_job not in json.dumps(got_b)


async def test_reconnect_with_last_seq_gets_exactly_what_was_missed(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # events are inserts only
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        async with connect(url(svc), additional_headers=bearer(token())) as ws:
            await recv(ws)
            insert(db)
            [seen] = events(await recv_until(ws, lambda m: m["type"] == "event"))
        last = seen["seq"]
        missed = [insert(db, user=USER_A if i % 2 else USER_B) for i in range(5)]
        # an admin resuming with ?since= gets the five, in order, then live events
        async with connect(url(svc, f"?since={last}"), additional_headers=bearer(token())) as ws:
            assert await recv(ws) == {"type": "resumed", "since": last}
            got = await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["id"] == missed[-1])
            assert [e["job"]["id"] for e in events(got)] == missed
            assert [e["seq"] for e in events(got)] == list(range(last + 1, last + 6))
            live = insert(db)
            [ev] = events(await recv_until(ws, lambda m: m["type"] == "event"))
            assert (ev["job"]["id"], ev["seq"]) == (live, last + 6)
        # user A resuming through the auth message gets only A's missed events
        async with connect(url(svc)) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token("authenticated", USER_A), "since": last}))
            assert await recv(ws) == {"type": "resumed", "since": last}
            got = await recv_until(ws, lambda m: m["type"] == "heartbeat" and m["seq"] >= last + 6)
            assert [e["job"]["id"] for e in events(got)] == [missed[1], missed[3]]
            assert {m["job_id"]: m["queue_position"] for m in got if m["type"] == "position"} == {
                missed[1]: 3, missed[3]: 5}
        # too old: the events after it were pruned
        db.execute("DELETE FROM reactor.events WHERE seq <= %s", (last + 2,))
        async with connect(url(svc, f"?since={last}"), additional_headers=bearer(token())) as ws:
            resync = await recv(ws)
            assert resync["type"] == "resync"
            snap = await recv(ws)
            assert snap["type"] == "snapshot" and snap["seq"] == last_seq(db)
            assert len(snap["queue"]) == 7
        # a seq this database never reached (another database, or a bogus client)
        async with connect(url(svc, "?since=999999"), additional_headers=bearer(token())) as ws:
            assert (await recv(ws))["type"] == "resync"
            assert (await recv(ws))["type"] == "snapshot"


async def test_admin_resuming_gets_current_stats_without_waiting_for_an_event(
        dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # nothing moves by itself
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        async with connect(url(svc), additional_headers=bearer(token())) as ws:
            await recv(ws)
        last = last_seq(db)
        missed = [insert(db) for _ in range(3)]
        async with connect(url(svc, f"?since={last}"), additional_headers=bearer(token())) as ws:
            assert await recv(ws) == {"type": "resumed", "since": last}
            got = await recv_until(ws, lambda m: m["type"] == "stats", timeout=10)
            assert [e["job"]["id"] for e in events(got)] == missed  # the missed events come first
            stats = got[-1]
            assert stats["seq"] == last + 3
            row = db.execute("SELECT queued FROM get_queue_stats()").fetchone()
            assert row is not None and stats["stats"]["queued"] == row[0]


async def test_resume_across_a_restart_and_on_another_reactor(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    port = free_port()
    async with OrchestratorDouble() as orch:
        async with feed_reactor(dsn, orch.url, port=port) as svc, \
                connect(url(svc), additional_headers=bearer(token())) as ws:
            snap = await recv(ws)
            first = insert(db)
            [ev] = events(await recv_until(ws, lambda m: m["type"] == "event"))
            assert ev["job"]["id"] == first
            last = ev["seq"]
            # the reactor stops under the client: it is told to go away (1001)
            svc.request_stop()
            code, _, _ = await closed_with(ws)
            assert code == 1001
        missed = [insert(db) for _ in range(3)]  # while no reactor runs
        async with feed_reactor(dsn, orch.url, port=port) as svc, \
                feed_reactor(dsn, orch.url, reactor_id="other") as other:
            async with connect(url(svc, f"?since={last}"), additional_headers=bearer(token())) as ws:
                assert (await recv(ws))["type"] == "resumed"
                got = await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["id"] == missed[-1])
                assert [e["job"]["id"] for e in events(got)] == missed
                last = events(got)[-1]["seq"]
            also = insert(db)
            # another reactor reads the same log: resume there from the seq seen here
            async with connect(url(other, f"?since={snap['seq']}"), additional_headers=bearer(token())) as ws:
                assert (await recv(ws))["type"] == "resumed"
                got = await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["id"] == also)
                assert [e["job"]["id"] for e in events(got)] == [first, *missed, also]
                assert [e["seq"] for e in events(got)] == list(range(snap["seq"] + 1, last + 2))


@pytest.mark.parametrize("case", [
    "no_token", "bad_signature", "alg_none", "expired", "not_json", "not_auth_first", "binary",
    "oversized", "anon_role", "no_sub",
])
async def test_bad_tokens_and_messages_are_refused_without_data(
    dsn: str, db: psycopg.Connection[Any], case: str,
) -> None:
    header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).decode()
    claims = jwt.utils.base64url_encode(json.dumps(
        {"role": "service_role", "exp": int(time.time()) + 3600}).encode()).decode()
    first: str | bytes | None = {
        "no_token": None,
        "bad_signature": json.dumps({"type": "auth", "token": jwt.encode(
            {"role": "service_role", "exp": int(time.time()) + 60}, "another-secret-0123456789abcdef-xyz",
            algorithm="HS256")}),
        "alg_none": json.dumps({"type": "auth", "token": f"{header}.{claims}."}),
        "expired": json.dumps({"type": "auth", "token": token(exp_in=-60)}),
        "not_json": "hello",
        "not_auth_first": json.dumps({"type": "subscribe"}),
        "binary": b'{"type": "auth"}',
        "oversized": json.dumps({"type": "auth", "token": "x" * 20_000}),
        "anon_role": json.dumps({"type": "auth", "token": token("anon")}),
        "no_sub": json.dumps({"type": "auth", "token": token("authenticated")}),
    }[case]
    expected = {"binary": 1003, "oversized": 1009}.get(case, 1008)
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc, \
            connect(url(svc), additional_headers=bearer(token())) as good:
        await recv(good)
        async with connect(url(svc)) as bad:
            if first is not None:
                await bad.send(first)
            insert(db, user=USER_A)  # there is something to leak
            code, reason, received = await closed_with(bad)
        assert received == []
        assert code == expected
        assert reason
        # the server keeps serving the others
        assert events(await recv_until(good, lambda m: m["type"] == "event"))
    assert svc.feed is not None and svc.feed.clients == 0


@pytest.mark.parametrize("value", [
    "Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer {expired}", "Bearer {none}", "Bearer {anon}",
])
async def test_bad_bearer_header_is_a_401(dsn: str, value: str) -> None:
    header = jwt.utils.base64url_encode(b'{"alg":"none"}').decode()
    claims = jwt.utils.base64url_encode(json.dumps(
        {"role": "service_role", "exp": int(time.time()) + 3600}).encode()).decode()
    value = value.format(expired=token(exp_in=-5), none=f"{header}.{claims}.", anon=token("anon"))
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(svc), additional_headers={"Authorization": value}):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.body.startswith(b"invalid token")


async def test_token_expiry_closes_unless_refreshed(dsn: str) -> None:
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc, \
            connect(url(svc)) as short, connect(url(svc)) as refreshed:
        await short.send(json.dumps({"type": "auth", "token": token("authenticated", USER_A, exp_in=3)}))
        await refreshed.send(json.dumps({"type": "auth", "token": token("authenticated", USER_A, exp_in=3)}))
        assert (await recv(short))["type"] == (await recv(refreshed))["type"] == "snapshot"
        await refreshed.send(json.dumps({"type": "auth", "token": token("authenticated", USER_A, exp_in=60)}))
        code, reason, _ = await closed_with(short, timeout=20)
        assert (code, reason) == (1008, "token expired")
        await anyio.sleep(0.5)
        # still open: heartbeats keep coming
        assert (await recv_until(refreshed, lambda m: m["type"] == "heartbeat"))[-1]["type"] == "heartbeat"
        # a token for someone else is refused
        await refreshed.send(json.dumps({"type": "auth", "token": token("authenticated", USER_B)}))
        code, reason, _ = await closed_with(refreshed)
        assert code == 1008 and "someone else" in reason


async def test_slow_client_is_dropped_without_delaying_others(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    async with OrchestratorDouble() as orch, \
            feed_reactor(dsn, orch.url, max_lag=200, write_buffer_bytes=16 * 1024,
                         send_buffer_bytes=16 * 1024) as svc:
        assert svc.feed is not None
        feed = svc.feed
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", feed.port))
        async with connect(url(svc), additional_headers=bearer(token())) as good, \
                connect(url(svc), sock=sock, additional_headers=bearer(token()), max_queue=1) as slow:
            await recv(good)
            await recv(slow)
            slow.transport.pause_reading()  # stops reading: its socket and buffers fill up
            for _ in range(20):
                started = time.monotonic()
                db.execute("INSERT INTO jobs (job_type, payload) SELECT 'topic_short', "
                           "jsonb_build_object('topic', repeat('x', 50) || g) FROM generate_series(1, 300) g")
                target = last_seq(db)
                got = await recv_until(good, is_event(target), timeout=30)
                # all of them, in order, while the slow client is stuck (a generous bound: shared CI cores)
                assert [e["seq"] for e in events(got)] == list(range(target - 299, target + 1))
                assert time.monotonic() - started < 10.0
                if feed.clients == 1:
                    break
            assert feed.clients == 1, "the slow client was not dropped"
            async with httpx.AsyncClient(base_url=http_base(svc)) as http:
                text = (await http.get("/metrics")).text
            dropped = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "reactor_feed_clients_dropped_total" and s.labels == {"reason": "too_slow"}]
            assert dropped == [1]
            # once it is gone, the good client still gets new events at once
            started = time.monotonic()
            one = insert(db)
            [ev] = events(await recv_until(good, lambda m: m["type"] == "event"))
            assert ev["job"]["id"] == one
            assert time.monotonic() - started < 5.0
            slow.transport.resume_reading()
            code, reason, _ = await closed_with(slow, timeout=30)
            assert code in (1013, None)  # 1013 "too slow", or cut off if the close frame could not be sent
            if code is not None:
                assert reason == "too slow"


async def test_handshake_limits(dsn: str) -> None:
    async with OrchestratorDouble() as orch, feed_reactor(
            dsn, orch.url, max_clients=2, allowed_origins=("https://app.example",)) as svc:
        async with httpx.AsyncClient(base_url=http_base(svc)) as http:
            assert (await http.get("/livez")).status_code == 200
            assert (await http.get("/nope")).status_code == 404  # unknown paths (/ is the dashboard)
            assert (await http.get("/feed?since=-1")).status_code == 400
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(svc), origin=Origin("https://evil.example")):
                pass
        assert info.value.response.status_code == 403
        async with connect(url(svc), origin=Origin("https://app.example"),
                           additional_headers=bearer(token())) as one, \
                connect(url(svc), additional_headers=bearer(token())) as two:
            assert (await recv(one))["type"] == (await recv(two))["type"] == "snapshot"
            with pytest.raises(InvalidStatus) as info:
                async with connect(url(svc), additional_headers=bearer(token())):
                    pass
            assert info.value.response.status_code == 503


async def test_metrics_parse_and_count_outcomes(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        ok = insert(db, topic="fine")
        bad = insert(db, topic="[[status=404]] missing")
        for j in (ok, bad):
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (j,),
                           expect=lambda s: s in ("completed", "failed"))
        async with httpx.AsyncClient(base_url=http_base(svc)) as http, \
                connect(url(svc), additional_headers=bearer(token())) as ws:
            await recv(ws)
            samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for _ in range(100):
                resp = await http.get("/metrics")
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/plain")
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(resp.text) for s in family.samples
                }
                if samples.get(("reactor_jobs_finished_total", (("error_category", "NOT_FOUND"),
                                                                ("outcome", "failed")))) and \
                        samples.get(("reactor_feed_clients", (("kind", "admin"),))) == 1:
                    break
                await anyio.sleep(0.1)
    assert all(name.startswith("reactor_") for name, _ in samples)
    assert samples[("reactor_database_up", ())] == 1
    assert samples[("reactor_jobs_finished_total", (("error_category", "none"), ("outcome", "completed")))] >= 1
    assert samples[("reactor_jobs_finished_total", (("error_category", "NOT_FOUND"), ("outcome", "failed")))] == 1
    assert samples[("reactor_job_wait_seconds_count", ())] >= 2
    assert samples[("reactor_job_run_seconds_count", (("outcome", "completed"),))] >= 1
    assert samples[("reactor_jobs", (("status", "failed"),))] == 1
    assert ("reactor_oldest_queued_age_seconds", ()) in samples
    assert ("reactor_notification_queue_usage_ratio", ()) in samples
    assert samples[("reactor_listener_connected", ())] == 1
    assert samples[("reactor_listener_reconnects_total", ())] == 0
    assert samples[("reactor_feed_clients", (("kind", "admin"),))] == 1
    assert ("reactor_sweep_recoveries_total", (("reason", "lease_expired"),)) not in samples  # none yet
    assert samples[("reactor_process_resident_memory_bytes", ())] > 0


async def test_readyz_follows_the_database() -> None:
    server = EmbeddedPostgres()  # private: this test stops it
    private = server.start()
    try:
        migrate_up(private)
        async with OrchestratorDouble() as orch, feed_reactor(private, orch.url) as svc, \
                httpx.AsyncClient(base_url=http_base(svc), timeout=10) as http:
            resp = await http.get("/readyz")
            assert resp.status_code == 200
            parts = {p: "running" for p in ("dispatcher", "listener", "feed", "sweeper", "scheduler", "alerts")}
            assert resp.json() == {"ready": True, "database": "ok", "listener": "connected", "stopping": False,
                                   "parts": parts}
            await anyio.to_thread.run_sync(server.stop)
            body: dict[str, Any] = {}
            for _ in range(100):
                resp = await http.get("/readyz")
                body = resp.json()
                if resp.status_code == 503 and body["listener"] == "disconnected":
                    break
                await anyio.sleep(0.1)
            assert resp.status_code == 503
            assert body["database"].startswith("unavailable") and body["listener"] == "disconnected"
            assert (await http.get("/livez")).status_code == 200  # alive all the same
            samples = [s for f in text_string_to_metric_families((await http.get("/metrics")).text)
                       for s in f.samples if s.name == "reactor_database_up"]
            assert samples[0].value == 0
            await anyio.to_thread.run_sync(server.start)
            for _ in range(300):
                resp = await http.get("/readyz")
                if resp.status_code == 200:
                    break
                await anyio.sleep(0.1)
            assert resp.status_code == 200, resp.text
            # and the feed works again
            async with connect(url(svc), additional_headers=bearer(token())) as ws:
                assert (await recv(ws))["type"] == "snapshot"
                with psycopg.connect(private, autocommit=True) as conn:
                    insert(conn)
                assert events(await recv_until(ws, lambda m: m["type"] == "event"))
    finally:
        server.destroy()


# -- a feed nobody is connected to (issue 19: three reactors' feeds must not each read the fleet's events)


async def scrape(svc: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=http_base(svc), timeout=10) as http:
        text = (await http.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def feed_at(svc: Service, seq: int) -> bool:
    """Whether /metrics says the feed has read the log up to ``seq``."""
    return (await scrape(svc)).get(("reactor_feed_seq", ())) == seq


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = PATIENCE_S) -> None:
    """Poll an async ``check`` until it holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


def watch_reads(svc: Service) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every read of the feed's pool from now on: (query name, rows)."""
    assert svc.feed is not None
    store = svc.feed.store
    reads: list[tuple[str, list[dict[str, Any]]]] = []
    rows = store.rows

    async def recorded(name: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        got = await rows(name, *args, **kwargs)
        reads.append((name, got))
        return got

    store.rows = recorded  # type: ignore[method-assign]
    return reads


async def test_a_feed_without_clients_reads_only_its_own_figures_yet_a_late_client_misses_nothing(
        dsn: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    serialised: list[int] = []
    entry = wire.entry

    def counted(row: Any) -> wire.Entry:
        serialised.append(row["seq"])
        return entry(row)

    monkeypatch.setattr(wire, "entry", counted)
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 4")
    async with OrchestratorDouble(latency_ms=2, jitter_ms=8) as orch, \
            feed_reactor(dsn, orch.url, reactor_id="watched") as svc, \
            running_reactor(dsn, orch.url, reactor_id="other"):
        assert svc.feed is not None and svc.feed.clients == 0
        mine = set(svc.metrics.actors)
        reads = watch_reads(svc)
        start = last_seq(db)
        jobs = [insert(db, user=USER_A if i % 3 == 0 else None,
                       topic="[[status=404]] gone" if i % 10 == 0 else f"t{i}") for i in range(40)]
        for j in jobs:
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (j,),
                           expect=lambda s: s in ("completed", "failed"))
        last = last_seq(db)
        # the feed's seq reaches the log's end with nobody connected...
        await eventually(lambda: feed_at(svc, last), f"the feed at seq {last}")
        assert svc.feed.last_seq == last

        # ...reading no event rows and serialising none: only how far the log goes, and this reactor's
        # own starts and ends (what its metrics count)
        names = {name for name, _ in reads}
        assert "feed_events" not in names and "feed_follow" in names, names
        assert serialised == []
        followed = [r for name, rows in reads if name == "feed_follow" for r in rows if r["seq"] is not None]
        own = db.execute(
            "SELECT seq, kind FROM reactor.events WHERE seq > %s AND seq <= %s AND actor = ANY(%s) "
            "AND kind IN ('started', 'completed', 'failed', 'retrying') ORDER BY seq",
            (start, last, list(mine))).fetchall()
        assert [(r["seq"], r["kind"]) for r in followed] == [tuple(r) for r in own]

        # its figures are exact all the same: every start and end of its own, none of the other's
        samples = await scrape(svc)
        counts = dict(db.execute(
            "SELECT kind || ':' || coalesce(error_category, 'none'), count(*) FROM reactor.events "
            "WHERE actor = ANY(%s) AND kind IN ('completed', 'failed') GROUP BY 1", (list(mine),)).fetchall())
        assert samples.get(("reactor_jobs_finished_total", (("error_category", "none"), ("outcome", "completed"))),
                           0) == counts.get("completed:none", 0)
        assert samples.get(("reactor_jobs_finished_total", (("error_category", "NOT_FOUND"), ("outcome", "failed"))),
                           0) == counts.get("failed:NOT_FOUND", 0)
        [[started]] = db.execute("SELECT count(*) FROM reactor.events WHERE actor = ANY(%s) AND kind = 'started' "
                                 "AND retry_count = 0", (list(mine),)).fetchall()
        assert samples[("reactor_job_wait_seconds_count", ())] == started

        # a client connecting now with the seq it had before gets every event since, from the log, in
        # order (the other reactor's too), then live ones
        everything = [int(r[0]) for r in db.execute(
            "SELECT seq FROM reactor.events WHERE seq > %s ORDER BY seq", (start,))]
        assert everything == list(range(start + 1, last + 1))
        async with connect(url(svc, f"?since={start}"), additional_headers=bearer(token())) as ws, \
                connect(url(svc)) as user:
            await user.send(json.dumps({"type": "auth", "token": token("authenticated", USER_A), "since": start}))
            assert await recv(ws) == {"type": "resumed", "since": start}
            assert await recv(user) == {"type": "resumed", "since": start}
            got = await recv_until(ws, is_event(last))
            assert [e["seq"] for e in events(got)] == everything
            live = insert(db, user=USER_A, topic="[[latency=100]] live")
            more = await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["id"] == live
                                    and m["job"]["status"] == "completed")
            got_user = await recv_until(user, lambda m: m["type"] == "event" and m["job"]["id"] == live
                                        and m["job"]["status"] == "completed")
        seqs = [e["seq"] for e in events(got + more)]
        assert seqs == list(range(start + 1, seqs[-1] + 1))  # nothing missed, nothing twice
        a_seqs = [int(r[0]) for r in db.execute(
            "SELECT seq FROM reactor.events WHERE seq > %s AND seq <= %s AND user_id = %s ORDER BY seq",
            (start, seqs[-1], USER_A))]
        assert [e["seq"] for e in events(got_user)] == a_seqs
        assert {e["job"]["user_id"] for e in events(got_user)} == {USER_A}
        assert "feed_events" in {name for name, _ in reads}  # with clients, the pump reads events again
        await eventually(lambda: feed_at(svc, last_seq(db)), "the feed at the log's end")


async def test_a_client_connecting_while_the_idle_feed_reads_misses_nothing(
        dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # events are inserts only
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc:
        assert svc.feed is not None
        feed = svc.feed
        store = feed.store
        rows = store.rows
        entered, release = anyio.Event(), anyio.Event()
        held = False

        async def held_once(name: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            nonlocal held
            if name == "feed_follow" and not held:
                held = True
                entered.set()
                await release.wait()  # the read starts (and takes its snapshot) only when released
            return await rows(name, *args, **kwargs)

        store.rows = held_once  # type: ignore[method-assign]
        start = last_seq(db)
        first = insert(db)  # wakes the idle feed: its read waits
        with anyio.fail_after(PATIENCE_S):
            await entered.wait()
        async with connect(url(svc, f"?since={start}"), additional_headers=bearer(token())) as ws:
            assert await recv(ws) == {"type": "resumed", "since": start}
            with anyio.fail_after(PATIENCE_S):
                while feed.clients != 1:
                    await anyio.sleep(0.01)
            later = [insert(db) for _ in range(3)]
            release.set()  # the idle read goes past what the client has read
            got = await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["id"] == later[-1])
            live = insert(db)
            got += await recv_until(ws, lambda m: m["type"] == "event" and m["job"]["id"] == live)
        assert [e["job"]["id"] for e in events(got)] == [first, *later, live]
        assert [e["seq"] for e in events(got)] == list(range(start + 1, start + 6))


async def test_a_client_of_a_reactor_with_no_work_gets_the_cycles_of_the_one_with_all_of_it_live(
        dsn: str, db: psycopg.Connection[Any]) -> None:
    """Migration 0017: a reactor's cycle that gives nobody else work is sent on reactor_log, which a
    listener follows only while its feed has clients. A client of a reactor that claims nothing gets
    the other's events as they commit all the same, not at its next heartbeat (a minute here), and
    the listener stops following once the client has gone."""
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 2, max_manim_renders = 2")
    watcher = ServiceSettings(
        dsn=dsn, orchestrator_url="http://127.0.0.1:9", handle_signals=False, reactor_id="watcher",
        dispatch=replace(FAST_DISPATCH, max_inflight=0),  # it claims nothing: the other does every job
        feed=replace(FEED, heartbeat_s=60.0, idle_interval_s=0.05),
    )
    async with OrchestratorDouble(latency_ms=5, jitter_ms=5) as orch, \
            running_service(Service(watcher)) as svc, \
            running_reactor(dsn, orch.url, reactor_id="worker"):
        assert not svc.listener.following_log
        start = last_seq(db)
        # a user, not an admin: an admin's coalesced stats would read the log's end on their own
        async with connect(url(svc, f"?since={start}"),
                           additional_headers=bearer(token("authenticated", USER_A))) as ws:
            assert await recv(ws) == {"type": "resumed", "since": start}
            await until(lambda: svc.listener.following_log, "the listener to follow reactor_log")
            log = psycopg.connect(dsn, autocommit=True)
            log.execute("LISTEN reactor_log")
            try:
                jobs = [insert(db, user=USER_A, topic=f"quiet-{i}") for i in range(12)]
                for j in jobs:
                    await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (j,),
                                   expect=lambda s: s == "completed")
                end = last_seq(db)
                got = await recv_until(ws, is_event(end), timeout=20.0)  # well before the heartbeat
                quiet = list(log.notifies(timeout=0.5))
            finally:
                log.close()
            assert [e["seq"] for e in events(got)] == list(range(start + 1, end + 1))
            assert db.execute("SELECT DISTINCT actor FROM reactor.events WHERE seq > %s AND kind = 'started'",
                              (start,)).fetchall() == [("reactor:worker",)]
            assert quiet, "some of the worker's cycles went on reactor_log"
            assert {json.loads(n.payload)["actor"] for n in quiet} == {"reactor:worker"}
        await until(lambda: not svc.listener.following_log, "the listener to stop following reactor_log")



@pytest.mark.parametrize("share", [1.0, 0.01])
async def test_admin_stats_are_read_no_more_often_than_their_cost_allows(
        dsn: str, db: psycopg.Connection[Any], share: float) -> None:
    """get_queue_stats() costs more as the last hour's finished jobs grow: the feed reads it at most
    every ``stats_interval_s``, and after a read of t seconds waits at least t / ``stats_share``
    before the next. Each gap between two stats messages is checked against the read before it;
    with ``stats_share`` 1.0 (the control) the reads come faster than that bound for 0.01."""
    at: list[float] = []  # when each stats message arrived
    spent: list[float] = []  # how long each stats read took
    async with OrchestratorDouble() as orch, \
            feed_reactor(dsn, orch.url, stats_interval_s=0.05, stats_share=share) as svc, \
            connect(url(svc), additional_headers=bearer(token())) as ws:
        assert svc.feed is not None
        rows = svc.feed.store.rows

        async def timed(name: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            t0 = time.monotonic()
            try:
                return await rows(name, *args, **kwargs)
            finally:
                if name == "feed_stats":
                    spent.append(time.monotonic() - t0)

        svc.feed.store.rows = timed  # type: ignore[method-assign]
        assert (await recv(ws))["type"] == "snapshot"

        async def read() -> None:
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "stats":
                    at.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            deadline = time.monotonic() + 30
            i = 0
            while (len(at) < 6 or i < 20) and time.monotonic() < deadline:
                insert(db, topic=f"stats-{i}")  # events all along: each wakes the stats loop
                i += 1
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert len(at) >= 6, (at, spent)
    # the k-th message follows the k-th read; the gap after it is at least that read / share
    gaps = [(b - a, spent[k] / 0.01) for k, (a, b) in enumerate(itertools.pairwise(at))]
    if share < 1:
        assert all(gap >= 0.8 * bound - 0.02 for gap, bound in gaps), gaps
    else:
        assert any(gap < 0.8 * bound - 0.02 for gap, bound in gaps), gaps
