"""The render cache (migration 0013): identical requests render once, across reactors; the others
complete with the same video and result.cached_from; payload.cache = false renders."""

from __future__ import annotations

import json
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
