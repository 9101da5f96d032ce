"""Regression tests for what the chaos suite found: claims lost in a database crash, and a sweep
that slept through a crash after an idle spell.

The reactor used to commit its claims asynchronously, so an immediate shutdown of PostgreSQL lost
the claims (and their ``started`` events) of the last moments. That killed the reactor that claimed
such a job again (a KeyError in the dispatcher), and let feed clients keep events that no longer
existed, under seqs that then named other events. The first three tests pin what must hold after an
immediate shutdown whatever the reactor's commit policy, and would catch it returning: this
module's server runs with ``wal_writer_delay = 10s``, so an asynchronous commit stays in the WAL
buffers (and is lost by an immediate shutdown) unless something flushes it, and nothing here does:
the test's own writes come before the claims, and the renders hang, so no outcome is written.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from reactor.db.embedded import EmbeddedPostgres
from tests.support.cluster import (
    FeedWatcher,
    check_feed,
    gather,
    held_by,
    insert_jobs,
    listeners,
    not_back_in_work,
    running_cluster,
    verify,
)
from tests.support.processes import Conn, scalar, until

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", autouse=True)
def lazy_wal_writer(chaos_pg: EmbeddedPostgres) -> Iterator[None]:
    with psycopg.connect(chaos_pg.dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        conn.execute("SELECT pg_reload_conf()")
    yield


def last_seq(conn: Conn) -> int:
    n: int = scalar(conn, "SELECT last_seq FROM reactor.counters")
    return n


async def test_immediate_restart_mid_render_neither_kills_the_reactor_nor_renders_twice(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, reactors=1, latency_ms=4000) as cluster:
        rp = cluster.reactors["r1"]
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 5, text="claimed just before the crash")
            await until(lambda: len(held_by(conn, "r1")) == 5, "r1 rendering all five", diag=cluster.diag)
        while (await cluster.double.stats())["in_flight"] < 5:  # the five renders under way
            await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(chaos_pg.restart, "immediate")
        with cluster.connect() as conn:
            # had the claims been committed asynchronously they would be gone now (the jobs queued
            # again while r1 still renders them), and r1 would claim them again
            await verify(cluster, conn, ids, limit=10, timeout=30)
            await anyio.sleep(5)  # every render r1 started has come back by now
            ev = gather(conn, await cluster.double.requests())
        log = rp.log(10**7)
        assert rp.alive and "Traceback" not in log, rp.diag()
        for job_id in ids:
            assert [e["kind"] for e in ev.events[job_id]].count("completed") == 1, ev.events[job_id]


async def test_feed_resume_after_a_crash_never_skips_renumbered_events(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    # r1 serves the feed only (--max-inflight 0); r2 renders, and hangs
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, reactors=0, latency_ms=60_000) as cluster, \
            anyio.create_task_group() as tg:
        cluster.add_reactor("r1", "--max-inflight", "0")
        cluster.add_reactor("r2")
        await cluster.wait_ready()
        watcher = FeedWatcher(lambda: [cluster.reactors["r1"].feed_url], cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            insert_jobs(conn, 3, text="claimed just before the crash")
            await until(lambda: len(held_by(conn, "r2")) == 3, "r2 rendering the three", diag=cluster.diag)
            seen = last_seq(conn)
            await watcher.wait_for(seen)
        watcher.stop()  # the client goes away, remembering seq `seen`
        cluster.reactors["r2"].kill()  # nobody claims for a while: what comes next is the test's own
        await anyio.to_thread.run_sync(chaos_pg.restart, "immediate")
        with cluster.connect() as conn:
            kept = last_seq(conn)
            insert_jobs(conn, seen - kept, text="after the crash")  # new events, numbered as the lost ones
            assert last_seq(conn) == seen
            await until(lambda: listeners(conn, cluster.dbname) == 1, "r1 listening again")
            again = FeedWatcher(lambda: [cluster.reactors["r1"].feed_url], cluster.token, name="resumed")
            again.segments = list(watcher.segments)
            again.seen = dict(watcher.seen)
            await tg.start(again.run)  # resumes with ?since=seen
            await again.wait_for(seen)
            insert_jobs(conn, 1, text="later")
            await again.wait_for(seen + 1)
            ev = gather(conn, [])
        again.stop()
    violations = check_feed(again, ev, allow_resync=True)
    assert not violations, "\n".join(violations)


async def test_connected_feed_client_is_not_left_with_events_lost_in_a_crash(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, reactors=0, latency_ms=60_000) as cluster, \
            anyio.create_task_group() as tg:
        cluster.add_reactor("r1", "--max-inflight", "0")
        cluster.add_reactor("r2")
        await cluster.wait_ready()
        feed = cluster.reactors["r1"]
        watcher = FeedWatcher(lambda: [feed.feed_url], cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            insert_jobs(conn, 3, text="claimed just before the crash")
            await until(lambda: len(held_by(conn, "r2")) == 3, "r2 rendering the three", diag=cluster.diag)
            seen = last_seq(conn)
            await watcher.wait_for(seen)
        cluster.reactors["r2"].kill()
        # the feed's reactor sleeps through the crash (a slow host, a long GC pause...): by the time it
        # looks at the log again, the log has grown past where it was
        feed.send(signal.SIGSTOP)
        await anyio.to_thread.run_sync(chaos_pg.restart, "immediate")
        with cluster.connect() as conn:
            kept = last_seq(conn)
            insert_jobs(conn, seen - kept + 2, text="after the crash")
            feed.send(signal.SIGCONT)
            await watcher.wait_for(last_seq(conn), timeout=60)
            ev = gather(conn, [])
        watcher.stop()
    assert watcher.connects == 1, watcher.drops
    violations = check_feed(watcher, ev, allow_resync=True)
    assert not violations, "\n".join(violations)


async def test_jobs_of_a_reactor_that_dies_after_an_idle_spell_are_rescued_soon(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    # both reactors swept at start and saw no lease; renders hang, so leases are all there is
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=60_000) as cluster:
        with cluster.connect() as conn:
            insert_jobs(conn, 3, text="held by a reactor about to die")
            await until(lambda: scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE status = 'processing'") == 3,
                        "the three claimed", diag=cluster.diag)
            victim = "r1" if held_by(conn, "r1") else "r2"
            hit = held_by(conn, victim)
            cluster.reactors[victim].kill()
            # the lease (3 s) runs out at most 4 s after the kill (renewed every 1 s); the sweep looks
            # 0.5 s after the earliest lease would expire; the rest is slack for a slow machine
            await until(lambda: not_back_in_work(conn, hit, [victim]) == 0,
                        f"the {len(hit)} jobs of {victim} back in work (3 s leases)", timeout=12)
