"""Pickup latency of two versions of the reactor, measured side by side.

    git worktree add /tmp/before HEAD~1                    # the code to compare against
    python3 bench/pickup_ab.py /tmp/before .  [--jobs 500] [--rate 50]

On a shared machine pickup moves by a millisecond from one hour to the next (bench/README.md), so
two runs taken minutes apart cannot show a change of a tenth of that. This runs both versions at
once, under the same load: one durable private PostgreSQL with a database per version (each
migrated by its own tree's ``reactor migrate``), one orchestrator double, and each tree's
``reactor run`` on its own database. Rows are inserted at ``--rate`` in all, alternating between the
two databases in A B B A order, so that each version sees the same moments of the machine. Latency
is the same as ``reactor_bench.py``'s: the insert's commit to the double receiving ``POST /render``.
The same tree given twice measures the method's own spread (within 0.05 ms at p50 here).

The render cache (migration 0013) is off in both databases unless ``--cache-a on`` / ``--cache-b on``
(then topic_short keeps the TTL its migration gave it). Every job has its own topic, so with the
cache on each one misses it: the same tree given twice, once with the cache and once without,
measures what asking the cache costs a job that renders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from pickup import http_json, pct
from psycopg import sql
from reactor_bench import ROOT, free_port, stop_processes, wait_http, wait_reactor_ready, without_render_cache

from reactor.db.embedded import EmbeddedPostgres

INSERT = "INSERT INTO jobs (job_type, payload) VALUES ('topic_short', %s) RETURNING id"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs=2, type=Path, help="two checkouts of reactor (A and B)")
    ap.add_argument("--jobs", type=int, default=500, help="jobs per version (default 500)")
    ap.add_argument("--rate", type=float, default=50.0, help="inserts per second, both versions together")
    for name in ("a", "b"):
        ap.add_argument(f"--cache-{name}", choices=("on", "off"), default="off",
                        help=f"the render cache of version {name.upper()} (default off)")
    args = ap.parse_args()
    caches = [args.cache_a == "on", args.cache_b == "on"]
    trees = [t.resolve() for t in args.trees]
    server = EmbeddedPostgres(settings={"max_connections": "100"})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        admin_dsn = server.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "reactor", "--log-level", "WARNING", "dev-orchestrator", "--port", str(port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"{url}/health")
        dsns = []
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            for i, tree in enumerate(trees):
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"pickup_ab_{i}")))
                dsn = server.dsn_for(f"pickup_ab_{i}")
                dsns.append(dsn)
                subprocess.run([sys.executable, "-m", "reactor", "migrate", "--dsn", dsn],
                               cwd=tree, check=True, capture_output=True)
                if not caches[i]:
                    without_render_cache(dsn)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "reactor", "--log-level", "WARNING", "run", "--dsn", dsn,
                     "--orchestrator-url", url],
                    cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for dsn in dsns:
            wait_reactor_ready(dsn)
        lat = measure(dsns, url, args.jobs, args.rate)
    finally:
        stop_processes(procs)
        server.stop()
        server.destroy()
    print(f"pickup at {args.rate:g} jobs/s in all, {args.jobs} jobs each, the two versions interleaved:")
    for name, tree, values, cache in zip("AB", trees, lat, caches, strict=True):
        print(f"  {name} {tree} (cache {'on' if cache else 'off'}): p50 {pct(values, 50):.2f} ms, "
              f"p90 {pct(values, 90):.2f} ms, p99 {pct(values, 99):.2f} ms ({len(values)} jobs)")
    print(f"  B - A at p50: {pct(lat[1], 50) - pct(lat[0], 50):+.2f} ms")
    return 0


def measure(dsns: list[str], url: str, n: int, rate: float) -> list[list[float]]:
    """Insert ``n`` rows into each database, alternating A B B A, ``rate`` rows/s in all; return
    each version's latencies (ms)."""
    conns = [psycopg.connect(dsn, autocommit=True) for dsn in dsns]
    try:
        for _ in range(20):  # warm-up: connections, plans, caches
            for conn in conns:
                conn.execute(INSERT, ('{"topic": "warm"}',))
                time.sleep(1 / rate)
        time.sleep(0.5)
        http_json(f"{url}/reset", "POST", {})
        commit_at: dict[str, tuple[int, float]] = {}
        next_at = time.perf_counter()
        for i in range(2 * n):
            k = i % 2 if (i // 2) % 2 == 0 else 1 - i % 2
            row = conns[k].execute(INSERT, (json.dumps({"topic": f"t{i}"}),)).fetchone()
            assert row is not None
            commit_at[str(row[0])] = (k, time.time())
            next_at += 1 / rate
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    finally:
        for conn in conns:
            conn.close()
    deadline = time.monotonic() + 30
    reqs = http_json(f"{url}/requests")
    while len(reqs) < 2 * n and time.monotonic() < deadline:
        time.sleep(0.2)
        reqs = http_json(f"{url}/requests")
    lat: list[list[float]] = [[], []]
    for r in reqs:
        if r["job_id"] in commit_at:
            k, t = commit_at[r["job_id"]]
            lat[k].append((float(r["received_at"]) - t) * 1000)
    if not lat[0] or not lat[1]:
        raise RuntimeError("the double received no render from one of the versions")
    return lat


if __name__ == "__main__":
    sys.exit(main())
