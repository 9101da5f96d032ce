"""The render cache (migration 0013): identical requests render once, across reactors; the others
complete with the same video and result.cached_from; payload.cache = false renders."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import running_reactor, wait_for

pytestmark = pytest.mark.anyio

Conn = psycopg.Connection[Any]


def jobs(db: Conn) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT id, status, result, cache_key, error_message FROM reactor.jobs "
                           "ORDER BY job_no").fetchall()


async def test_twenty_identical_jobs_on_three_reactors_render_once(dsn: str, db: Conn) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 30")
    async with OrchestratorDouble(latency_ms=700) as orch, running_reactor(dsn, orch.url, reactor_id="r1"), \
            running_reactor(dsn, orch.url, reactor_id="r2"), running_reactor(dsn, orch.url, reactor_id="r3"):
        db.execute("INSERT INTO jobs (job_type, payload) SELECT 'topic_short', '{\"topic\": \"Photosynthesis\"}' "
                   "FROM generate_series(1, 20)")
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 20)
        assert len(orch.requests) == 1
        done = jobs(db)
        [renderer] = [j for j in done if "cached_from" not in j["result"]]
        assert renderer["id"] == uuid.UUID(orch.requests[0]["job_id"])
        assert {j["result"]["video_url"] for j in done} == {renderer["result"]["video_url"]}
        assert {j["result"]["thumbnail_url"] for j in done} == {renderer["result"]["thumbnail_url"]}
        assert {j["result"].get("cached_from") for j in done if j is not renderer} == {str(renderer["id"])}
        stats = db.execute("SELECT renders_saved FROM get_queue_stats()").fetchone()
        assert stats == (19,)
        entry = db.execute("SELECT job_id, status, request FROM reactor.render_cache").fetchall()
        assert entry == [(renderer["id"], "completed", {"job_type": "topic_short", "input": "Photosynthesis",
                                                        "style": "default", "length": "short", "voice": "default"})]

        # within the TTL: at once from the cache; opted out: rendered
        db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"Photosynthesis\"}')")
        db.execute("INSERT INTO jobs (job_type, payload) VALUES "
                   "('topic_short', '{\"topic\": \"Photosynthesis\", \"cache\": false}')")
        # another voice is another request; a doubt is never cached
        db.execute("INSERT INTO jobs (job_type, payload) VALUES "
                   "('topic_short', '{\"topic\": \"Photosynthesis\", \"voice\": \"asha\"}'), "
                   "('doubt', '{\"question\": \"Photosynthesis\"}'), ('doubt', '{\"question\": \"Photosynthesis\"}')")
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status = 'completed'", expect=lambda n: n == 25)
        assert len(orch.requests) == 5
        assert db.execute("SELECT renders_saved FROM get_queue_stats()").fetchone() == (20,)
    kinds = db.execute("SELECT kind FROM job_events WHERE job_id = (SELECT id FROM reactor.jobs "
                       "WHERE result ? 'cached_from' ORDER BY job_no DESC LIMIT 1) ORDER BY seq").fetchall()
    assert [k[0] for k in kinds] == ["inserted", "started", "completed"]


async def test_waiters_render_themselves_when_the_render_fails(dsn: str, db: Conn) -> None:
    async with OrchestratorDouble(latency_ms=500) as orch, running_reactor(dsn, orch.url, reactor_id="r1"):
        # the first attempt of the first job fails for good (404), the input is the same for all three
        first = json.dumps({"topic": "Osmosis [[status=404]]"})
        db.execute("INSERT INTO jobs (job_type, payload) SELECT 'topic_short', %s FROM generate_series(1, 3)",
                   (first,))
        await wait_for(dsn, "SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')",
                       expect=lambda n: n == 3, timeout=60)
    # each renders in turn (none completes from a failed render)
    assert len(orch.requests) == 3
    assert {j["status"] for j in jobs(db)} == {"failed"}
    assert db.execute("SELECT count(*) FROM reactor.render_cache").fetchone() == (0,)


def test_the_claim_keys_each_job_and_says_what_the_cache_holds(db: Conn) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 100, max_manim_renders = 100")
    db.execute("INSERT INTO jobs (job_type, payload) VALUES "
               "('topic_short', '{\"topic\": \" Osmosis \"}'), ('topic_short', '{\"topic\": \"Osmosis\"}'), "
               "('topic_short', '{\"topic\": \"Osmosis\", \"cache\": false}'), "
               "('doubt', '{\"question\": \"Osmosis\"}')")
    claim = ("SELECT id, payload, cache_key, cache_state FROM reactor.finish_settle_and_claim("
             "'[]', 'r1', %s, interval '60 s', now(), '{\"style\": \"default\", \"length\": \"short\", "
             "\"voice\": \"default\"}') ORDER BY created_at")
    with db.cursor(row_factory=dict_row) as cur:
        first = cur.execute(claim, (1,)).fetchall()
        rest = cur.execute(claim, (10,)).fetchall()
    [renders] = first
    assert renders["cache_state"] == "render" and len(renders["cache_key"]) == 64
    entry = db.execute("SELECT key, job_id, status FROM reactor.render_cache").fetchall()
    assert entry == [(renders["cache_key"], renders["id"], "rendering")]
    # the same request (trimmed): wait for it; opted out, or a type without a TTL: no key, nothing to ask
    assert [(r["cache_key"] == renders["cache_key"], r["cache_state"]) for r in rest] == [
        (True, "wait"), (False, None), (False, None)]
    assert [r["cache_key"] for r in rest[1:]] == [None, None]
    # once it completed, an identical job claimed is a hit
    db.execute("UPDATE reactor.render_cache SET status = 'completed', completed_at = now(), "
               "result = '{\"video_url\": \"https://cdn.example/v.mp4\"}'")
    db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"Osmosis\"}')")
    with db.cursor(row_factory=dict_row) as cur:
        [hit] = cur.execute(claim, (10,)).fetchall()
    assert (hit["cache_key"], hit["cache_state"]) == (renders["cache_key"], "hit")


def test_asking_the_cache_and_settling_it_take_the_locks_in_one_order(dsn: str, db: Conn) -> None:
    """render_cache_take (a waiter parks itself: a journalled write) and the outcomes settling the same
    key (finish_settle_and_claim: the journal, then the key) take the journal lock and the key's lock
    in the same order: the first no longer holds the key while its commit waits for the journal that
    the second holds while it waits for the key (a deadlock that aborted an INSERT in fleet_bench)."""
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = 100, max_manim_renders = 100")
    db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"Osmosis\"}'), "
               "('topic_short', '{\"topic\": \"Osmosis\"}')")
    claim = ("SELECT id, cache_key, cache_state FROM reactor.finish_settle_and_claim(%s::jsonb, 'r1', %s, "
             "interval '60 s', now(), '{\"style\": \"default\", \"length\": \"short\", \"voice\": \"default\"}') "
             "ORDER BY created_at")
    first, second = db.execute(claim, ("[]", 10)).fetchall()
    assert (first[2], second[2]) == ("render", "wait") and first[1] == second[1]
    key = first[1]
    errors: list[BaseException] = []
    with psycopg.connect(dsn) as asker:
        # the second job asks the cache itself (as the reactor does when the claim's tried lock was
        # taken): the first still renders, so it parks, in a transaction not yet committed
        [(decision,)] = asker.execute(
            "SELECT decision FROM reactor.render_cache_take(%s, 1, 'r1', %s, '{}', interval '2 minutes')",
            (second[0], key)).fetchall()
        assert decision == "wait"
        pid = asker.info.backend_pid

        def settle() -> None:
            done = [{"id": str(first[0]), "attempt": 1, "status": "completed", "retry_count": 0, "delay_s": 0,
                     "error_category": None, "error_message": None, "error_details": None, "cache_key": key,
                     "result": {"video_url": "https://cdn.example/v.mp4"}}]
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(claim, (json.dumps(done), 0)).fetchall()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=settle)
        t.start()
        deadline = time.monotonic() + 30
        while not db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                             "AND pid <> %s", (pid,)).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline and t.is_alive(), errors
            time.sleep(0.02)
        asker.commit()
        t.join(30)
    assert not t.is_alive() and errors == []
    got = {r["id"]: r for r in jobs(db)}
    assert got[first[0]]["status"] == "completed"
    assert got[second[0]]["status"] == "completed"
    assert got[second[0]]["result"]["cached_from"] == str(first[0])
