"""Render-farm outage: how fast the reactor recovers, with the circuit breaker's defaults.

    python3 bench/outage_bench.py [--outage 60] [--rate 50] [--latency-ms 20]

One reactor (default settings: 5 failures open the circuit, /health probed with backoff capped at
30 s) and the orchestrator double; jobs are offered at --rate per second throughout. The double is
stopped for --outage seconds, then started again on the same port. Prints the time from its return
to the first completed job and to the queue drained, and checks that no job failed and no retry
was spent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres
from reactor.db.migrations import migrate_up
from reactor.service import Service, ServiceSettings
from reactor.testing.orchestrator import OrchestratorDouble


async def offer(dsn: str, rate: float, stop: anyio.Event) -> int:
    n = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        next_at = time.monotonic()
        while not stop.is_set():
            n += 1
            await conn.execute(
                "INSERT INTO jobs (job_type, payload) VALUES (%s, %s)",
                ("topic_short", json.dumps({"topic": f"t{n}"})),
            )
            next_at += 1 / rate
            with anyio.move_on_after(max(0.0, next_at - time.monotonic())):
                await stop.wait()
    return n


async def main_async(args: argparse.Namespace, dsn: str) -> None:
    orch = OrchestratorDouble(latency_ms=args.latency_ms)
    await orch.start()
    port = orch.port
    service = Service(ServiceSettings(dsn=dsn, orchestrator_url=orch.url, handle_signals=False))
    stop = anyio.Event()
    offered = 0

    async def run_offer() -> None:
        nonlocal offered
        offered = await offer(dsn, args.rate, stop)

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

        async def count(sql: str) -> int:
            cur = await conn.execute(sql)
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            tg.start_soon(run_offer)
            await anyio.sleep(5)
            await orch.stop()
            t_down = time.monotonic()
            await anyio.sleep(args.outage)
            done_before = await count("SELECT count(*) FROM jobs WHERE status = 'completed'")
            await orch.start(port=port)
            t_back = time.monotonic()
            first = drained = None
            while drained is None:
                done = await count("SELECT count(*) FROM jobs WHERE status = 'completed'")
                if first is None and done > done_before:
                    first = time.monotonic() - t_back
                if first is not None and time.monotonic() - t_back > first + 1:
                    stop.set()
                if stop.is_set() and await count("SELECT count(*) FROM jobs WHERE status <> 'completed'") == 0:
                    drained = time.monotonic() - t_back
                await anyio.sleep(0.02)
            failed = await count("SELECT count(*) FROM jobs WHERE status = 'failed'")
            retries = await count("SELECT coalesce(sum(retry_count), 0) FROM jobs")
            service.request_stop()
    moves = [f"{t.old}->{t.new}@{t.at - t_down:.1f}s" for t in service.dispatcher.circuit.transitions]
    print(f"offered {offered} jobs at {args.rate:g}/s; outage {args.outage:g} s; "
          f"{done_before} completed before the return")
    print(f"circuit: {', '.join(moves)}")
    print(f"orchestrator back -> first completed job: {first:.2f} s")
    print(f"orchestrator back -> queue drained:       {drained:.2f} s")
    print(f"failed jobs: {failed}; retries spent: {retries}  {'PASS' if failed == 0 and retries == 0 else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    server = EmbeddedPostgres(settings=FAST_SETTINGS)
    try:
        dsn = server.start()
        migrate_up(dsn)
        anyio.run(main_async, args, dsn, backend="asyncio")
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
