"""Schedules under faults (issue 17, acceptance): three reactors as real processes and a
`* * * * *` schedule for five minutes, reactors killed (SIGKILL) and restarted around the slot
times, all three down across one slot: exactly one job per slot, and every slot has its job.

The long run is marked slow (``pytest tests/chaos -m slow``); the suite's fast variants are in
tests/integration/test_schedules.py (six sessions with skewed clocks, some killed mid-transaction)
and tests/integration/test_schedule_reactors.py (three in-process reactors on an accelerated clock).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from reactor.db.embedded import EmbeddedPostgres
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.anyio


def key(slot: datetime) -> str:
    return f"schedule:every:{slot.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


async def sleep_until(conn_now: datetime, target: datetime) -> None:
    await anyio.sleep(max(0.0, (target - conn_now).total_seconds()))


@pytest.mark.slow
async def test_three_reactors_one_job_per_slot_for_five_minutes(
    chaos_pg: EmbeddedPostgres, chaos_dsn: str, tmp_path: Path,
) -> None:
    rng = random.Random(17)
    async with running_cluster(chaos_pg, chaos_dsn, tmp_path, reactors=3) as cluster:
        with cluster.connect() as conn:
            row = conn.execute(
                "INSERT INTO job_schedules (name, cron, job_type, payload) "
                "VALUES ('every', '* * * * *', 'daily_ca', '{\"date\": \"{{date}}\"}') "
                "RETURNING next_run_at").fetchone()
            assert row is not None
            first: datetime = row[0]
            slots = [first + timedelta(minutes=m) for m in range(5)]

            def db_now() -> datetime:
                value: datetime = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
                return value

            for m, slot in enumerate(slots):
                if m == 2:
                    # all three down from 2 s before the slot to 5 s after it (catch_up latest: it
                    # runs when they are back, still once)
                    await sleep_until(db_now(), slot - timedelta(seconds=2))
                    for rp in list(cluster.reactors.values()):
                        rp.kill()
                    await sleep_until(db_now(), slot + timedelta(seconds=5))
                    for rid in list(cluster.reactors):
                        await cluster.restart_reactor(rid)
                    continue
                # one reactor killed just before the slot, another just after, both back soon
                victims = rng.sample(sorted(cluster.reactors), 2)
                await sleep_until(db_now(), slot - timedelta(seconds=rng.uniform(0.05, 1.0)))
                cluster.reactors[victims[0]].kill()
                await sleep_until(db_now(), slot + timedelta(seconds=rng.uniform(0.0, 0.3)))
                cluster.reactors[victims[1]].kill()
                for rid in victims:
                    await cluster.restart_reactor(rid)
            await sleep_until(db_now(), slots[-1] + timedelta(seconds=20))
            keys = [r[0] for r in conn.execute(
                "SELECT idempotency_key FROM jobs WHERE schedule_name = 'every' ORDER BY idempotency_key")]
            done = conn.execute("SELECT count(*) FROM jobs WHERE schedule_name = 'every' "
                                "AND status = 'completed'").fetchone()
            made = conn.execute("SELECT jobs_created FROM job_schedules").fetchone()
        crashed = [f"{rp.reactor_id}: {rp.crashed()}" for rp in cluster.all_reactors if rp.crashed()]
    assert not crashed, crashed
    assert keys == [key(s) for s in slots], keys
    assert made == (5,)
    assert done == (5,)
