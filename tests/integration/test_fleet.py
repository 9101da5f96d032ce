"""Three reactor processes on one database (issue 19): the fleet-wide limits hold at every moment, no
job is rendered twice, every job completes, and every reactor's feed reads the same log to its end.

Only behaviour is asserted, never timing: the machine may be slow and shared. The limits are
sampled from the database while the reactors work (the jobs in processing, by renderer) and from
the orchestrator double (renders in flight, by type); the double's request log says what was
rendered. Renders take a few milliseconds with jitter, so that outcomes and claims of the three
interleave. bench/fleet_bench.py measures the same set-up for speed.
"""

from __future__ import annotations

import socket
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.processes import PATIENCE_S, ReactorProcess, jobs_state, reactor_process, until

pytestmark = pytest.mark.anyio

Conn = psycopg.Connection[Any]

JOBS = 400
LIMIT = 4
MANIM_LIMIT = 2  # 'doubt' renders with manim
#: the feed (for its seq and /metrics) needs a way to check tokens
FEED_ENV = {"REACTOR_JWT_SECRET": "a-test-secret-that-is-long-enough-for-hs256"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metric(rp: ReactorProcess, name: str) -> float | None:
    """One sample of a reactor's /metrics (``name`` with its labels, as printed), None if absent."""
    with urllib.request.urlopen(f"{rp.http_base}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_three_reactors_keep_the_limits_render_each_job_once_and_finish_all(
    dsn: str, db: Conn, tmp_path: Path,
) -> None:
    db.execute("UPDATE job_queue_config SET max_concurrent_renders = %s, max_manim_renders = %s",
               (LIMIT, MANIM_LIMIT))
    seen: list[tuple[int, int]] = []  # (processing, processing manim) as sampled

    async def sample(done: anyio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while not done.is_set():
                cur = await conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'processing'), "
                    "count(*) FILTER (WHERE status = 'processing' AND renderer = 'manim') FROM reactor.jobs")
                row = await cur.fetchone()
                assert row
                seen.append((int(row[0]), int(row[1])))
                await anyio.sleep(0.005)

    async with OrchestratorDouble(latency_ms=2, jitter_ms=8) as orch:
        with reactor_process(dsn, orch.url, tmp_path, "fleet-a", env=FEED_ENV, feed_port=free_port()) as a, \
                reactor_process(dsn, orch.url, tmp_path, "fleet-b", env=FEED_ENV, feed_port=free_port()) as b, \
                reactor_process(dsn, orch.url, tmp_path, "fleet-c", env=FEED_ENV, feed_port=free_port()) as c:
            fleet = (a, b, c)
            for rp in fleet:
                await rp.wait_ready()
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample, done)
                # three priorities, two renderers, queued in one statement and then one by one
                db.execute(
                    "INSERT INTO jobs (job_type, priority, payload) "
                    "SELECT CASE WHEN g %% 3 = 0 THEN 'doubt' ELSE 'topic_short' END, "
                    "       (ARRAY['low', 'medium', 'high'])[1 + g %% 3], "
                    "       jsonb_build_object('question', 'q' || g, 'topic', 't' || g) "
                    "FROM generate_series(1, %s) g", (JOBS // 2,))
                for g in range(JOBS // 2):
                    db.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', jsonb_build_object("
                               "'topic', %s::text))", (f"one-{g}",))
                await until(lambda: db.execute(
                    "SELECT count(*) FROM reactor.jobs WHERE status = 'completed'").fetchone() == (JOBS,),
                    "every job completed", timeout=PATIENCE_S * 3,
                    diag=lambda: jobs_state(db) + "".join(rp.diag() for rp in fleet))
                done.set()
            for rp in fleet:
                assert rp.crashed() is None, rp.diag()

            # the fleet-wide limits, at every moment sampled and at the render farm
            assert seen and max(p for p, _ in seen) <= LIMIT, max(seen)
            assert max(m for _, m in seen) <= MANIM_LIMIT, max(seen)
            stats = orch.stats()
            assert stats["max_in_flight"] <= LIMIT
            assert stats["max_in_flight_by_type"].get("doubt", 0) <= MANIM_LIMIT
            # each job rendered once, and started once
            rendered = Counter(r["job_id"] for r in orch.requests)
            assert len(rendered) == JOBS and max(rendered.values()) == 1
            assert db.execute("SELECT count(*), count(DISTINCT job_id) FROM job_events "
                              "WHERE kind = 'started'").fetchone() == (JOBS, JOBS)
            assert db.execute("SELECT count(*) FROM reactor.jobs WHERE attempt <> 1").fetchone() == (0,)

            # every reactor's feed reads the one log up to its end: the same last seq on all three
            [last_seq] = db.execute("SELECT last_seq FROM reactor.counters").fetchone() or (None,)
            assert last_seq is not None
            await until(lambda: all(metric(rp, "reactor_feed_seq") == last_seq for rp in fleet),
                        f"every feed at seq {last_seq}",
                        diag=lambda: f": {[metric(rp, 'reactor_feed_seq') for rp in fleet]}")
            # and each counts its claims (the fleet's claims, with those that found nothing)
            claims = [metric(rp, 'reactor_claims_total{result="jobs"}') for rp in fleet]
            assert all(n is not None for n in claims) and sum(n or 0 for n in claims) > 0
