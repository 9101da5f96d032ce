"""Chaos: real reactors, a real orchestrator double and a real PostgreSQL, with faults injected.

Each test starts two reactor processes (``--lease-seconds 3 --listen``) and the double as processes
around a fresh database on the module's private server, keeps an admin feed client connected
(it follows the live reactors, resuming with ``?since=`` when its reactor goes away), injects one
fault under load, and then checks every invariant of ``tests/support/cluster.py``: nothing lost,
nothing rendered twice unless a lease was lost, no zombie outcome, the fleet-wide limit kept, and a
gapless feed that matches the event log.
"""

from __future__ import annotations

import logging
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from reactor.db.embedded import EmbeddedPostgres
from tests.support.cluster import (
    Cluster,
    FeedWatcher,
    feed_clients,
    held_by,
    insert_jobs,
    insert_one,
    kill_listeners,
    listeners,
    not_back_in_work,
    notify_flood,
    running_cluster,
    vanishing_clients,
    verify,
)
from tests.support.processes import Conn, scalar, until

pytestmark = pytest.mark.anyio

logger = logging.getLogger(__name__)

RecordProperty = Callable[[str, object], None]


def set_limit(cluster: Cluster, n: int) -> None:
    with cluster.connect() as conn:
        conn.execute("UPDATE job_queue_config SET max_concurrent_renders = %s, max_manim_renders = %s", (n, n))


# -- the LISTEN backends killed -------------------------------------------------------------------


async def test_killed_listen_backends(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=50) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 10)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 30, text="before")
            await until(lambda: listeners(conn, cluster.dbname) == 2, "both listeners connected")
            fault_at = time.monotonic()
            assert kill_listeners(conn, cluster.dbname) == 2
            # straight away: these NOTIFYs reach nobody, only the re-read after the reconnect finds them
            hit = insert_jobs(conn, 30, text="while the listeners are down")
            ids += hit
            await until(lambda: listeners(conn, cluster.dbname) == 2, "both listeners back", diag=cluster.diag)
            reconnect_s = time.monotonic() - fault_at
            await verify(cluster, conn, ids, limit=10, watchers=[watcher])
            recovery_s = time.monotonic() - fault_at
        watcher.stop()
    record_property("listener_reconnect_s", round(reconnect_s, 2))
    record_property("listener_recovery_s", round(recovery_s, 2))
    assert watcher.connects == 1, watcher.drops


# -- PostgreSQL restarted -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart(
    mode: str, chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=300, jitter_ms=300) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 10)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 40, text="before the restart")
            await until(lambda: scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE status = 'processing'") >= 5,
                        "renders in flight", diag=cluster.diag)
        fault_at = time.monotonic()
        await anyio.to_thread.run_sync(chaos_pg.restart, mode)
        back_at = time.monotonic()
        with cluster.connect() as conn:
            after = insert_jobs(conn, 20, text="after the restart")
            await until(lambda: listeners(conn, cluster.dbname) == 2, "both listeners back", diag=cluster.diag)
            listeners_s = time.monotonic() - back_at
            # claims are durable, so even an immediate shutdown loses none: no job is rendered
            # twice, and no event the feed sent can vanish (no resync either)
            await verify(cluster, conn, ids + after, limit=10, watchers=[watcher])
            recovery_s = time.monotonic() - fault_at
        assert all(rp.alive for rp in cluster.reactors.values()), cluster.diag()
        watcher.stop()
    record_property(f"restart_{mode}_down_s", round(back_at - fault_at, 2))
    record_property(f"restart_{mode}_listeners_back_s", round(listeners_s, 2))
    record_property(f"restart_{mode}_all_done_s", round(recovery_s, 2))


# -- a reactor SIGKILLed mid-render ---------------------------------------------------------------


async def test_sigkill_mid_render(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    # each reactor takes at most 5 of the 10 renders the fleet may run (a reactor that finishes
    # claims again in the same round trip, so one reactor alone could keep all the work)
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=2000,
                               reactor_options=["--max-inflight", "5"]) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 10)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        victim = cluster.reactors["r1"]
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 20, text="rendering when the reactor dies")
            await until(lambda: len(held_by(conn, "r1")) >= 3, "r1 rendering", diag=cluster.diag)
            hit = held_by(conn, "r1")
            victim.kill()
            recovery_s = await until(lambda: not_back_in_work(conn, hit, ["r1"]) == 0,
                                     f"the {len(hit)} jobs of the killed reactor back in work", timeout=60,
                                     diag=cluster.diag)
            await cluster.restart_reactor("r1")
            ids += insert_jobs(conn, 10, text="after the restart")
            ev = await verify(cluster, conn, ids, limit=10, watchers=[watcher])
        watcher.stop()
    record_property("sigkill_recovery_s", round(recovery_s, 2))
    logger.info("SIGKILL: %d jobs back in work after %.1f s", len(hit), recovery_s)
    assert recovery_s < 45, f"{recovery_s:.1f} s to rescue the killed reactor's jobs"
    for job_id in hit:  # each was taken back once by a sweep, as a TIMEOUT, and finished elsewhere
        kinds = [(e["kind"], e["actor"], e["error_category"]) for e in ev.events[job_id]]
        assert ("retrying", kinds[2][1], "TIMEOUT") == kinds[2] and kinds[2][1].endswith(":sweep"), kinds
        assert kinds[-1][0] == "completed", kinds


# -- a reactor SIGSTOPped past its lease: a zombie ------------------------------------------------


async def test_sigstopped_reactor_is_a_zombie_that_cannot_overwrite(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    # each reactor takes 3 of the 6 renders the fleet may run
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=6000,
                               reactor_options=["--max-inflight", "3"]) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 6)
        watcher = FeedWatcher(lambda: [cluster.reactors["r2"].feed_url], cluster.token)
        await tg.start(watcher.run)
        zombie = cluster.reactors["r1"]
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 6, text="a six-second render")
            await until(lambda: len(held_by(conn, "r1")) == 3 and len(held_by(conn, "r2")) == 3,
                        "three renders at each reactor", diag=cluster.diag)
            hit = held_by(conn, "r1")

            async def zombie_sent() -> bool:
                # claimed is not yet sent: on a loaded machine r1 can be stopped between its claim's
                # commit and its render calls, and then only r2 renders
                reqs = await cluster.double.requests()
                return all(any(r["job_id"] == j for r in reqs) for j in hit)

            sent_by = time.monotonic() + 60
            while not await zombie_sent():
                assert time.monotonic() < sent_by, cluster.diag()
                await anyio.sleep(0.05)
            zombie.send(signal.SIGSTOP)
            stopped_at = time.monotonic()

            def taken_over() -> bool:
                return bool(scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE id = ANY(%s::uuid[]) "
                                         "AND status = 'processing' AND locked_by = 'r2' AND attempt = 2",
                                   (hit,)) == len(hit))

            takeover_s = await until(taken_over, "r2 to take over the stopped reactor's jobs", diag=cluster.diag)

            async def zombie_answered() -> bool:
                reqs = await cluster.double.requests()
                return all(any(r["job_id"] == j and r["answered_at"] for r in reqs) for j in hit)

            while not await zombie_answered():
                assert time.monotonic() - stopped_at < 60, cluster.diag()
                await anyio.sleep(0.2)
            # the zombie wakes holding a video for each attempt 1, which r2 took over (its attempt 2
            # may have finished meanwhile on a slow machine): what it writes must be discarded
            zombie.send(signal.SIGCONT)
            await zombie.wait_log("outcome discarded")
            ev = await verify(cluster, conn, ids, limit=6, watchers=[watcher], allowance=len(hit),
                              allowance_why=f"{len(hit)} renders of the stopped reactor")
        zombie_alive = zombie.alive
        watcher.stop()
    record_property("sigstop_takeover_s", round(takeover_s, 2))
    for job_id in hit:
        kinds = [(e["kind"], e["actor"]) for e in ev.events[job_id]]
        assert kinds == [("inserted", "sql:postgres"), ("started", "reactor:r1"), ("retrying", "reactor:r2:sweep"),
                         ("started", "reactor:r2"), ("completed", "reactor:r2")], kinds
        assert ev.jobs[job_id]["attempt"] == 2
        videos = [r for r in ev.requests[job_id] if r["outcome"] == "ok" and r["answered_at"]]
        assert len(videos) == 2, videos  # both rendered: the lease expired, as allowed
    assert zombie_alive, zombie.diag()
    assert 'msg="outcome discarded' in zombie.log(10**7)


# -- the orchestrator down, slow, answering garbage -----------------------------------------------


async def test_orchestrator_killed_and_restarted(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=500) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 10)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 40, text="rendering when the farm dies")
            await until(lambda: scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE status = 'processing'") >= 8,
                        "renders in flight", diag=cluster.diag)
            await cluster.double.kill()
            ids += insert_jobs(conn, 10, text="while the farm is down")
            for rp in cluster.reactors.values():
                await rp.wait_log("circuit closed -> open")
            await anyio.sleep(3)
            await cluster.double.start()
            back_at = time.monotonic()
            await verify(cluster, conn, ids, limit=10, watchers=[watcher])
            recovery_s = time.monotonic() - back_at
            spent = scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE retry_count > 0 OR status <> 'completed'")
        watcher.stop()
    record_property("orchestrator_back_to_all_done_s", round(recovery_s, 2))
    assert spent == 0, "an outage must not spend retries nor fail jobs"


async def test_orchestrator_slow_then_answering_garbage(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=50) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 8)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            await cluster.double.control(latency_ms=2500)
            ids = insert_jobs(conn, 24, text="slow farm")
            await until(lambda: scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE status = 'completed'") >= 8,
                        "the slow renders coming back", diag=cluster.diag)
            await cluster.double.control(latency_ms=50, mix={"ok": 2, "garbage": 1, "malformed": 1})
            ids += insert_jobs(conn, 30, text="garbage farm")
            await anyio.sleep(3)
            await cluster.double.control(mix={"ok": 1})
            ev = await verify(cluster, conn, ids, limit=8, watchers=[watcher])
        watcher.stop()
    unknown = [e for evs in ev.events.values() for e in evs if e["error_category"] == "UNKNOWN"]
    assert unknown, "the garbage answers were never seen as UNKNOWN errors"


# -- load: a burst of jobs, a NOTIFY flood --------------------------------------------------------


async def burst(chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, n: int, limit: int,
                record_property: RecordProperty) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path) as cluster, anyio.create_task_group() as tg:
        set_limit(cluster, limit)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            started = time.monotonic()
            ids = insert_jobs(conn, n, text="burst")
            insert_s = time.monotonic() - started
            await verify(cluster, conn, ids, limit=limit, watchers=[watcher], timeout=600)
            took = time.monotonic() - started
        watcher.stop()
    record_property("burst_insert_s", round(insert_s, 2))
    record_property("burst_all_done_s", round(took, 2))
    logger.info("burst of %d: inserted in %.2f s, all done in %.1f s (%.0f jobs/s)", n, insert_s, took, n / took)


async def test_burst_of_jobs_in_one_insert(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    await burst(chaos_pg, chaos_dsn, tmp_path, 10_000, 50, record_property)


def pickup_seconds(conn: Conn, ids: list[str], requests: list[dict[str, Any]]) -> list[float]:
    """created_at -> the double's received_at of each job's first render."""
    created = {str(r[0]): r[1].timestamp() for r in conn.execute(
        "SELECT id, created_at FROM reactor.jobs WHERE id = ANY(%s::uuid[])", (ids,))}
    first: dict[str, float] = {}
    for r in requests:
        first.setdefault(str(r["job_id"]), float(r["received_at"]))
    return [first[j] - created[j] for j in ids if j in first]


async def notify_flood_scenario(chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, n: int,
                                record_property: RecordProperty) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path) as cluster, anyio.create_task_group() as tg:
        set_limit(cluster, 10)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        flood_done = anyio.Event()
        flood_s = 0.0

        async def flood() -> None:
            nonlocal flood_s
            try:
                flood_s = await anyio.to_thread.run_sync(notify_flood, cluster.dsn, n)
            finally:
                flood_done.set()

        with cluster.connect() as conn:
            tg.start_soon(flood)
            ids: list[str] = []
            while not flood_done.is_set():
                ids.append(insert_one(conn, f"during the flood {len(ids)}"))
                await anyio.sleep(0.05)
            ids += [insert_one(conn, f"after the flood {i}") for i in range(5)]
            await verify(cluster, conn, ids, limit=10, watchers=[watcher])
            pickups = sorted(pickup_seconds(conn, ids, await cluster.double.requests()))
        watcher.stop()
    p50 = statistics.median(pickups)
    p99 = pickups[min(len(pickups) - 1, int(len(pickups) * 0.99))]
    record_property("flood_s", round(flood_s, 2))
    record_property("flood_pickup_p50_ms", round(p50 * 1000, 1))
    record_property("flood_pickup_p99_ms", round(p99 * 1000, 1))
    logger.info("%d NOTIFYs in %.1f s; %d jobs meanwhile, pickup p50 %.1f ms p99 %.1f ms max %.1f ms",
                n, flood_s, len(ids), p50 * 1000, p99 * 1000, pickups[-1] * 1000)
    assert len(ids) >= 10, "the flood was over before the jobs could measure anything"
    assert p99 < 2.0, f"pickup during the flood: p99 {p99:.2f} s"


async def test_notify_flood(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    await notify_flood_scenario(chaos_pg, chaos_dsn, tmp_path, 50_000, record_property)


# -- feed clients that connect and vanish ---------------------------------------------------------


async def test_feed_clients_that_vanish(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=20) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 10)
        watcher = FeedWatcher(lambda: [cluster.reactors["r1"].feed_url], cluster.token)
        await tg.start(watcher.run)

        async def clients() -> float:
            total = 0.0
            async with httpx.AsyncClient(timeout=10) as http:
                for rp in cluster.live_reactors():
                    total += feed_clients((await http.get(f"{rp.http_base}/metrics")).text)
            return total

        with cluster.connect() as conn:
            ids = insert_jobs(conn, 20, text="before the crowd")
            got = await vanishing_clients(cluster.feed_urls(), 200, cluster.token)
            assert got == 200
            ids += insert_jobs(conn, 20, text="while the crowd vanishes")
            started = time.monotonic()
            while await clients() != 1:
                assert time.monotonic() - started < 60, f"feed clients still counted: {await clients()}"
                await anyio.sleep(0.2)
            cleanup_s = time.monotonic() - started
            ids += insert_jobs(conn, 20, text="after the crowd")
            await verify(cluster, conn, ids, limit=10, watchers=[watcher])
        watcher.stop()
    record_property("vanished_clients_cleanup_s", round(cleanup_s, 2))
    assert watcher.connects == 1, watcher.drops
