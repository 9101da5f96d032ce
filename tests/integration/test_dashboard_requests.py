"""The dashboard's side of the feed, without a browser: its page, its requests, and who may act."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect

from reactor.testing.orchestrator import OrchestratorDouble
from tests.integration.test_feed import USER_A, USER_B, feed_reactor, http_base, insert, recv, token, url

pytestmark = pytest.mark.anyio

ADMIN = "00000000-0000-0000-0000-0000000000ad"


def admin() -> str:
    return token("authenticated", sub=ADMIN, app_metadata={"role": "admin"})


async def signed_in(ws: ClientConnection, tok: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "auth", "token": tok}))
    snap = await recv(ws)
    assert snap["type"] == "snapshot"
    return snap


async def ask(ws: ClientConnection, msg: dict[str, Any]) -> dict[str, Any]:
    """Send a request and return its answer (events and other messages in between are skipped)."""
    rid = f"t{id(msg)}"
    await ws.send(json.dumps({**msg, "request_id": rid}))
    while True:
        got = await recv(ws)
        if got.get("request_id") == rid:
            return got


def events_by(db: psycopg.Connection[Any], actor: str) -> int:
    row = db.execute("SELECT count(*) FROM job_events WHERE actor = %s", (actor,)).fetchone()
    assert row
    return int(row[0])


async def test_the_page_is_served_with_its_assets(dsn: str) -> None:
    async with feed_reactor(dsn, "http://127.0.0.1:9") as svc, httpx.AsyncClient(base_url=http_base(svc)) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/static/app.js"' in page.text
        js = await http.get("/static/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        css = await http.get("/static/app.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert (await http.get("/static/missing.js")).status_code == 404


async def test_a_user_may_read_own_jobs_and_do_nothing_else(dsn: str, db: psycopg.Connection[Any]) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    mine, theirs = insert(db, user=USER_A), insert(db, user=USER_B)
    async with feed_reactor(dsn, "http://127.0.0.1:9") as svc, connect(url(svc)) as ws:
        await signed_in(ws, token("authenticated", sub=USER_A))
        for action in ({"action": "cancel", "id": mine}, {"action": "retry", "id": mine},
                       {"action": "pause"}, {"action": "resume"},
                       {"action": "set_limits", "values": {"max_concurrent_renders": 50}}):
            got = await ask(ws, {"type": "action", **action})
            assert got["type"] == "action_result"
            assert (got["ok"], got["error"]) == (False, "forbidden"), got
        assert (await ask(ws, {"type": "status"}))["error"] == "forbidden"
        other = await ask(ws, {"type": "job", "id": theirs})
        assert other["error"] == "not found" and "job" not in other
        own = await ask(ws, {"type": "job", "id": mine})
        assert own["job"]["id"] == mine and own["job"]["payload"] == {"topic": "t"}
        assert [e["kind"] for e in own["events"]] == ["inserted"]
        assert "actor" not in own["events"][0]
    assert db.execute("SELECT status FROM jobs WHERE id = %s", (mine,)).fetchone() == ("queued",)
    assert db.execute("SELECT max_concurrent_renders FROM job_queue_config").fetchone() == (0,)
    assert events_by(db, f"admin:{USER_A}") == 0


async def test_admin_actions_are_the_runbooks_and_name_who_did_them(
    dsn: str, db: psycopg.Connection[Any],
) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")
    job = insert(db)
    me = f"admin:{ADMIN}"
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc, connect(url(svc)) as ws:
        await signed_in(ws, admin())
        status = await ask(ws, {"type": "status"})
        assert status["config"]["max_concurrent_renders"] == 0 and status["stats"]["queued"] == 1
        assert status["alerts"] == [] and status["circuits"] == []

        assert (await ask(ws, {"type": "action", "action": "cancel", "id": job}))["ok"] is True
        assert db.execute("SELECT kind, actor FROM job_events WHERE job_id = %s ORDER BY seq DESC LIMIT 1",
                          (job,)).fetchone() == ("cancelled", me)
        again = await ask(ws, {"type": "action", "action": "cancel", "id": job})
        assert again["ok"] is True and again["changed"] is False
        assert (await ask(ws, {"type": "action", "action": "retry", "id": job}))["ok"] is True
        assert db.execute("SELECT status FROM jobs WHERE id = %s", (job,)).fetchone() == ("queued",)
        refused = await ask(ws, {"type": "action", "action": "retry", "id": job})
        assert refused["ok"] is False and "only a failed or cancelled job" in refused["error"]
        unknown = await ask(ws, {"type": "action", "action": "cancel", "id": "00000000-0000-0000-0000-000000000000"})
        assert unknown["ok"] is False and "no job" in unknown["error"]

        for bad in ({"action": "cancel", "id": "nope"}, {"action": "explode"},
                    {"action": "set_limits", "values": {"job_timeout_minutes": 1}},
                    {"action": "set_limits", "values": {"max_manim_renders": -1}},
                    {"action": "set_limits", "values": {"max_manim_renders": "4"}}):
            got = await ask(ws, {"type": "action", **bad})
            assert got["ok"] is False and got["error"], got

        resumed = await ask(ws, {"type": "action", "action": "resume"})
        assert resumed["ok"] is True and resumed["max_concurrent_renders"] == 10
        assert (await ask(ws, {"type": "action", "action": "pause"}))["ok"] is True
        assert db.execute("SELECT paused_by FROM reactor.paused_limits").fetchone() == (me,)
        limits = await ask(ws, {"type": "action", "action": "set_limits",
                                "values": {"max_concurrent_renders": 6, "max_manim_renders": 2}})
        assert limits["ok"] is True and limits["config"] == {"max_concurrent_renders": 6, "max_manim_renders": 2}
        # the connection is still good for the feed itself
        insert(db)
        while (await recv(ws))["type"] != "event":
            pass
    assert db.execute("SELECT max_concurrent_renders, max_manim_renders FROM job_queue_config").fetchone() == (6, 2)


async def test_alerts_and_circuits_are_forwarded_to_admins(dsn: str, db: psycopg.Connection[Any]) -> None:
    async with feed_reactor(dsn, "http://127.0.0.1:9") as svc, connect(url(svc)) as adm, \
            connect(url(svc)) as user:
        await signed_in(adm, admin())
        await signed_in(user, token("authenticated", sub=USER_A))
        # as the alerts and the circuit breaker send them (the reactor's listener hears both channels)
        alert = {"alert": "queue_depth", "status": "firing", "value": 51, "threshold": 50,
                 "since": "2024-05-01T14:02:00+00:00", "reactor": "r1", "summary": "51 jobs queued"}
        db.execute("SELECT pg_notify('reactor_alerts', %s)", (json.dumps(alert),))
        circuit = {"reactor": "r1", "circuit": "open", "since": "2024-05-01T14:02:00Z"}
        db.execute("SELECT pg_notify('reactor_fleet', %s)", (json.dumps(circuit),))
        got = [m for m in [await recv(adm) for _ in range(2)] if m["type"] not in ("heartbeat", "stats")]
        while len(got) < 2:
            m = await recv(adm)
            if m["type"] not in ("heartbeat", "stats"):
                got.append(m)
        assert got == [{"type": "alert", **alert}, {"type": "circuit", **circuit}]
        # users hear nothing of it (their next message is a heartbeat)
        assert (await recv(user))["type"] == "heartbeat"


async def test_status_shows_the_schedules_next_runs_and_delayed_jobs_show_as_scheduled(
    dsn: str, db: psycopg.Connection[Any],
) -> None:
    db.execute("INSERT INTO job_schedules (name, cron, job_type, payload, enabled) VALUES "
               "('digest', '0 6 * * *', 'daily_ca', '{\"date\": \"{{date}}\"}', true), "
               "('weekly', '0 7 * * MON', 'topic_short', '{\"topic\": \"recap {{date}}\"}', false)")
    delayed = db.execute("INSERT INTO jobs (job_type, payload, run_after) VALUES "
                         "('topic_short', '{\"topic\": \"later\"}', now() + interval '1 hour') RETURNING id").fetchone()
    assert delayed is not None
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url) as svc, connect(url(svc)) as ws:
        snap = await signed_in(ws, admin())
        [job] = [j for j in snap["jobs"] if j["id"] == str(delayed[0])]
        assert job["status"] == "queued" and job["scheduled"] is True and job["run_after"]
        assert snap["queue"] == []  # no position until due
        status = await ask(ws, {"type": "status"})
        assert [(s["name"], s["enabled"], s["next_run_at"] is not None) for s in status["schedules"]] == [
            ("digest", True, True), ("weekly", False, False)]
        # a delayed job inserted now arrives as an event that says so
        later = db.execute("INSERT INTO jobs (job_type, payload, run_after) VALUES "
                           "('topic_short', '{\"topic\": \"l\"}', now() + interval '1 hour') RETURNING id").fetchone()
        assert later is not None
        while True:
            msg = await recv(ws)
            if msg["type"] == "event" and msg["job"]["id"] == str(later[0]):
                break
        assert msg["kind"] == "inserted" and msg["job"]["scheduled"] is True and msg["job"]["run_after"]
