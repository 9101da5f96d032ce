"""The long chaos scenarios (``pytest tests/chaos -m slow``; skipped otherwise): every fault of the
soak in a row under a steady load, and bigger versions of the short suite's load scenarios."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from reactor.db.embedded import EmbeddedPostgres
from tests.chaos.test_faults import burst, notify_flood_scenario, set_limit
from tests.support.cluster import FeedWatcher, held_by, insert_jobs, kill_listeners, running_cluster, verify
from tests.support.processes import REPO, until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RecordProperty = Callable[[str, object], None]



def test_soak_gauntlet() -> None:
    """bench/soak.py for 4 minutes, a fault every 12-27 s: every invariant holds, no reactor dies."""
    proc = subprocess.run(
        [sys.executable, "bench/soak.py", "--minutes", "4", "--fault-every", "12", "--burst", "5000"],
        cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "invariants: all hold" in proc.stdout, proc.stdout[-6000:]


async def test_big_notify_flood(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    await notify_flood_scenario(chaos_pg, chaos_dsn, tmp_path, 500_000, record_property)


async def test_burst_of_50000(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path, record_property: RecordProperty,
) -> None:
    await burst(chaos_pg, chaos_dsn, tmp_path, 50_000, 50, record_property)


async def test_burst_drained_through_a_sigkill_and_a_listener_kill(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, latency_ms=5, jitter_ms=20,
                               reactor_options=["--max-inflight", "15"]) as cluster, \
            anyio.create_task_group() as tg:
        set_limit(cluster, 30)
        watcher = FeedWatcher(cluster.feed_urls, cluster.token)
        await tg.start(watcher.run)
        with cluster.connect() as conn:
            ids = insert_jobs(conn, 10_000, text="burst")
            await until(lambda: len(held_by(conn, "r1")) > 0, "r1 rendering")
            await anyio.sleep(3)
            cluster.reactors["r1"].kill()
            await anyio.sleep(5)
            await cluster.restart_reactor("r1")
            await anyio.sleep(2)
            assert kill_listeners(conn, cluster.dbname) == 2
            await verify(cluster, conn, ids, limit=30, watchers=[watcher], timeout=900)
        watcher.stop()
