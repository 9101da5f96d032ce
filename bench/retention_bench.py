#!/usr/bin/env python3
"""Retention: pickup while finished jobs are pruned, and table size under churn.

    python3 bench/retention_bench.py --mode prune [--finished 1000000] [--baseline 60] [--rate 50]
    python3 bench/retention_bench.py --mode churn [--minutes 10] [--rate 50] [--retention '1 minute']

Starts a private, durable PostgreSQL (autovacuum on), the orchestrator double (answering at once) and
one reactor, as separate processes, and inserts jobs one at a time at ``--rate`` per second.

* ``prune``: first loads ``--finished`` completed jobs, 40 days old, with ``job_retention`` set out of
  their reach; measures pickup for ``--baseline`` seconds; then sets ``job_retention`` to 30 days and
  runs ``reactor prune`` (batches of 1,000, each its own transaction) while the reactor's sweep
  prunes too, and measures pickup until the prune ends. Prints pickup p50/p99 before and during, the
  prune's duration and rate, and the jobs left.
* ``churn``: ``job_retention`` = ``--retention``, the sweep every 10 s; for ``--minutes`` jobs go in,
  complete and are pruned by the sweep. Prints per minute: pickup p50/p99, jobs in the table,
  and the size on disk of reactor.jobs and reactor.events (with their indexes).

Pickup: from the INSERT's return to the double receiving ``POST /render``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pickup import http_json, pct  # noqa: E402
from pressure_bench import Run, inserter  # noqa: E402
from reactor_bench import free_port, stop_processes, wait_http, wait_reactor_ready  # noqa: E402

from reactor.db.embedded import EmbeddedPostgres  # noqa: E402


def load_finished(dsn: str, n: int) -> None:
    """``n`` completed jobs that finished 40 days ago, each with its three events."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = 0
        while done < n:
            step = min(100_000, n - done)
            conn.execute(
                "INSERT INTO jobs (job_type, status, payload, result, created_at, started_at, completed_at) "
                "SELECT 'topic_short', 'completed', jsonb_build_object('topic', 'old ' || g), "
                "jsonb_build_object('video_url', 'https://cdn.example/v/' || g || '.mp4'), "
                "now() - interval '40 days', now() - interval '40 days', now() - interval '40 days' "
                "FROM generate_series(1, %s) g", (step,))
            done += step
        conn.execute("VACUUM ANALYZE reactor.jobs")
        conn.execute("VACUUM ANALYZE reactor.events")


def pickups(run: Run, received: dict[str, float], t_from: float, t_to: float) -> list[float]:
    return [(received[s.job_id] - (run.t0 + s.at)) * 1000 for s in run.samples
            if t_from <= s.at < t_to and s.job_id in received]


def sizes(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM reactor.jobs), pg_total_relation_size('reactor.jobs'), "
                       "pg_total_relation_size('reactor.events')").fetchone()
    assert row
    return int(row[0]), int(row[1]), int(row[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["prune", "churn"], default="prune")
    ap.add_argument("--finished", type=int, default=1_000_000, help="finished jobs to prune (--mode prune)")
    ap.add_argument("--baseline", type=float, default=60.0, help="seconds of pickup before the prune")
    ap.add_argument("--rate", type=float, default=50.0, help="jobs inserted per second (default 50)")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the churn (--mode churn)")
    ap.add_argument("--retention", default="1 minute", help="job_retention for the churn")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    with tempfile.TemporaryDirectory(prefix="reactor-retention-") as tmp:
        logdir = Path(tmp)
        server = EmbeddedPostgres(settings={"max_connections": "300", "shared_buffers": "128MB"})
        dsn = server.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            subprocess.run([sys.executable, "-m", "reactor", "migrate", "--dsn", dsn], cwd=ROOT, env=env,
                           check=True, stdout=subprocess.DEVNULL)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 50, max_manim_renders = 50")
                if args.mode == "prune":
                    conn.execute("UPDATE job_queue_config SET job_retention = '3650 days'")
                else:
                    conn.execute("UPDATE job_queue_config SET job_retention = %s::interval", (args.retention,))
            if args.mode == "prune":
                t = time.monotonic()
                load_finished(dsn, args.finished)
                print(f"loaded {args.finished:,} finished jobs in {time.monotonic() - t:.0f} s", flush=True)
            orch_port = free_port()
            orch_url = f"http://127.0.0.1:{orch_port}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "reactor", "--log-level", "WARNING", "dev-orchestrator", "--port",
                 str(orch_port)], cwd=ROOT, env=env, stdout=open(logdir / "orch.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT))
            wait_http(f"{orch_url}/health")
            sweep = ["--sweep-seconds", "10"] if args.mode == "churn" else []
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "reactor", "--log-level", "WARNING", "run", "--dsn", dsn,
                 "--orchestrator-url", orch_url, *sweep], cwd=ROOT, env=env,
                stdout=open(logdir / "reactor.log", "wb"), stderr=subprocess.STDOUT))  # noqa: SIM115
            wait_reactor_ready(dsn)
            run = Run()
            feeder = threading.Thread(target=inserter, args=(dsn, args.rate, run), daemon=True)
            feeder.start()
            if args.mode == "prune":
                result = prune_phase(dsn, env, run, args.baseline)
            else:
                result = churn_phase(dsn, run, args.minutes)
            run.stop.set()
            feeder.join(timeout=60)
            time.sleep(3)
            received = {r["job_id"]: float(r["received_at"]) for r in http_json(f"{orch_url}/requests")}
            return report(args, run, received, result)
        finally:
            stop_processes(procs)
            server.destroy()


def prune_phase(dsn: str, env: dict[str, str], run: Run, baseline_s: float) -> dict[str, Any]:
    time.sleep(max(0.0, run.t0 + baseline_s - time.time()))
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = sizes(conn)
        conn.execute("UPDATE job_queue_config SET job_retention = '30 days'")
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "reactor", "--log-level", "WARNING", "prune", "--dsn", dsn,
                          "--json"], cwd=ROOT, env=env, check=True, capture_output=True)
    end = time.time()
    time.sleep(5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        after = sizes(conn)
    return {"prune_from": start - run.t0, "prune_to": end - run.t0, "cli": json.loads(out.stdout),
            "before": before, "after": after}


def churn_phase(dsn: str, run: Run, minutes: float) -> dict[str, Any]:
    per_minute: list[tuple[int, int, int]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for m in range(int(minutes)):
            time.sleep(max(0.0, run.t0 + 60 * (m + 1) - time.time()))
            per_minute.append(sizes(conn))
    return {"per_minute": per_minute}


def report(args: argparse.Namespace, run: Run, received: dict[str, float], result: dict[str, Any]) -> int:
    def fig(lat: list[float]) -> str:
        return f"{len(lat)} jobs, pickup p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms"

    if args.mode == "prune":
        base = pickups(run, received, 5.0, args.baseline)
        during = pickups(run, received, result["prune_from"], result["prune_to"])
        secs = result["prune_to"] - result["prune_from"]
        cli = result["cli"]
        print(f"before the prune: {fig(base)}")
        print(f"during the prune: {fig(during)}")
        print(f"prune: {cli['jobs_pruned']:,} jobs and {cli['events_pruned']:,} events by `reactor prune` in "
              f"{cli['batches']} batches, {secs:.0f} s ({cli['jobs_pruned'] / max(secs, 0.001):,.0f} jobs/s); "
              f"jobs in the table {result['before'][0]:,} -> {result['after'][0]:,}")
        lost = [s for s in run.samples if s.job_id not in received]
        print(f"not picked up: {len(lost)}")
        return 0 if not lost else 1
    print(f"churn: {args.rate:g} jobs/s, job_retention {args.retention}, sweep every 10 s")
    print("| minute | pickup p50 / p99 ms | jobs in table | reactor.jobs size | reactor.events size |")
    print("|---|---|---|---|---|")
    for m, (n, jobs_b, events_b) in enumerate(result["per_minute"]):
        lat = pickups(run, received, 60 * m, 60 * (m + 1))
        print(f"| {m + 1} | {pct(lat, 50):.1f} / {pct(lat, 99):.1f} | {n:,} | {jobs_b / 1e6:.1f} MB | "
              f"{events_b / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
