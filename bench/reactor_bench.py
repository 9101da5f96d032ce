"""Reactor benchmarks: pickup latency, throughput, idle cost.

    python3 bench/reactor_bench.py [--quick] [--fast] [--only pickup,floor,throughput,idle]

Starts a private PostgreSQL, the orchestrator double and one reactor as separate processes, so
the figures include real process boundaries, and prints:

* pickup latency: INSERT commit (the client's execute returned) to the orchestrator receiving
  ``POST /render``, at 50 jobs/s, p50 / p99 (goal p50 <= 2.5 ms, p99 <= 8 ms);
* the floor for that on this machine now: bench/bare_pickup.py (INSERT, trigger NOTIFY, a bare
  SKIP LOCKED claim and one POST, no limits, events or leases) on the same server and double,
  right after; the reactor's figures are printed as a ratio to it;
* throughput: 5,000 jobs queued by one INSERT, the double answering at once, limit 10: jobs/s from
  the INSERT to the last completion (goal >= 1,000 jobs/s);
* idle cost: transactions per minute on the database while the reactor has nothing to do,
  counted in the server log over 120 s (60 s with --quick) from 75 s after start, with
  pg_stat_database's count beside it (goal <= 6).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bare_pickup  # noqa: E402
import pickup  # noqa: E402
from pickup import http_json  # noqa: E402

from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres  # noqa: E402
from reactor.db.migrations import migrate_up  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_json(url)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Procs:
    def __init__(self, dsn: str, logdir: Path) -> None:
        self.dsn = dsn
        self.logdir = logdir
        self.orch_port = free_port()
        self.orch_url = f"http://127.0.0.1:{self.orch_port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_orchestrator(self) -> None:
        log = open(self.logdir / "orchestrator.log", "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "reactor", "--log-level", "WARNING", "dev-orchestrator",
             "--port", str(self.orch_port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ))
        wait_http(f"{self.orch_url}/health")

    def start_reactor(self) -> subprocess.Popen[bytes]:
        log = open(self.logdir / "reactor.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(
            [sys.executable, "-m", "reactor", "--log-level", "WARNING", "run", "--dsn", self.dsn,
             "--orchestrator-url", self.orch_url],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        self.procs.append(p)
        return p

    def stop(self) -> None:
        stop_processes(self.procs)


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float = 20) -> None:
    """SIGTERM, the last started first; SIGKILL what has not ended within ``timeout_s`` each."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def without_render_cache(dsn: str) -> None:
    """The benchmarks measure the render path: jobs with the same input must each render, not
    complete from the render cache (migration 0013; an older schema has no cache to turn off)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
                     "'public' AND table_name = 'job_types' AND column_name = 'cache_ttl') THEN "
                     "UPDATE public.job_types SET cache_ttl = NULL; END IF; END $$")


def wait_reactor_ready(dsn: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reactor listener' "
            "AND query ILIKE 'listen%%'"
        ).fetchone()[0]:  # type: ignore[index]
            if time.monotonic() > deadline:
                raise RuntimeError("reactor did not start LISTENing")
            time.sleep(0.05)


def bench_pickup(dsn: str, procs: Procs, n: int, rate: float) -> dict[str, float]:
    return pickup.measure(
        dsn, procs.orch_url, n, rate,
        insert_sql="INSERT INTO jobs (job_type, payload) VALUES ('topic_short', %s) RETURNING id",
        warm_sql="INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"warm\"}')",
    )


def bench_throughput(dsn: str, procs: Procs, n: int) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 10, max_manim_renders = 10")
        done0 = conn.execute("SELECT count(*) FROM reactor.jobs WHERE status = 'completed'").fetchone()[0]  # type: ignore[index]
        t0 = time.perf_counter()
        conn.execute(
            "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 't' || g) "
            "FROM generate_series(1, %s) g", (n,),
        )
        while True:
            done = conn.execute("SELECT count(*) FROM reactor.jobs WHERE status = 'completed'").fetchone()[0]  # type: ignore[index]
            if done - done0 >= n:
                break
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"only {done - done0} of {n} completed in 300 s")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
    stats = http_json(f"{procs.orch_url}/stats")
    return {"n": n, "seconds": elapsed, "jobs_per_s": n / elapsed, "max_in_flight": stats["max_in_flight"]}


def bench_idle(dsn: str, seconds: float, server_log: Path) -> dict[str, float]:
    """Transactions the idle reactor causes in its database, counted two ways.

    * ``pg_stat_database.xact_commit + xact_rollback``, read from another database (reading adds
      nothing to the count). PostgreSQL reports a backend's counts when that backend next goes
      idle after a flush interval, so a backend that runs one statement a minute (the listener's
      probe) is reported late or not at all within a window: this count can be low.
    * the server log: ``log_statement = all`` for the window (ALTER SYSTEM, reloaded, restored
      after); each statement outside BEGIN ... COMMIT is one transaction, each BEGIN one more.
      This is the figure judged against the goal.

    The window opens 75 s after start: the listener's four LISTENs are reported with its first
    probe at 60 s and belong to starting, not idling. Autovacuum is paused for the window: a
    worker's visit counts its own transactions in the database it visits.
    """
    target = psycopg.conninfo.conninfo_to_dict(dsn)
    dbname = str(target.get("dbname", "postgres"))
    other = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    settings = {"autovacuum": "off", "log_statement": "all", "log_line_prefix": "%m|%p|%d| "}
    with psycopg.connect(other, autocommit=True) as conn:
        def xacts() -> int:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,),
            ).fetchone()
            assert row
            return int(row[0])

        for name, value in settings.items():
            conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
        try:
            time.sleep(75)
            before, log_from = xacts(), server_log.stat().st_size
            time.sleep(seconds)
            after, log_to = xacts(), server_log.stat().st_size
        finally:
            for name in settings:
                conn.execute(psycopg.sql.SQL("ALTER SYSTEM RESET {}").format(psycopg.sql.Identifier(name)))
            conn.execute("SELECT pg_reload_conf()")
    with open(server_log, "rb") as f:
        f.seek(log_from)
        text = f.read(log_to - log_from).decode(errors="replace")
    logged = count_logged_transactions(text, dbname)
    return {"seconds": seconds, "transactions": logged, "per_minute": logged * 60 / seconds,
            "stats_transactions": after - before, "stats_per_minute": (after - before) * 60 / seconds}


def count_logged_transactions(text: str, dbname: str) -> int:
    """Top-level transactions in a ``log_statement = all`` log with prefix ``%m|%p|%d| ``."""
    count = 0
    open_tx: set[str] = set()
    for line in text.splitlines():
        parts = line.split("|", 3)
        if len(parts) < 4 or parts[2] != dbname or "LOG:  " not in parts[3]:
            continue
        pid, msg = parts[1], parts[3].split("LOG:  ", 1)[1]
        if not (msg.startswith("statement: ") or msg.startswith("execute ")):
            continue
        stmt = msg.split(": ", 1)[1].strip().rstrip(";").upper()
        if stmt in ("BEGIN", "START TRANSACTION"):
            open_tx.add(pid)
            count += 1
        elif stmt in ("COMMIT", "ROLLBACK", "END"):
            open_tx.discard(pid)
        elif pid not in open_tx:
            count += 1
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (about a minute in all)")
    ap.add_argument("--fast", action="store_true", help="PostgreSQL with fsync off (default: durable defaults)")
    ap.add_argument("--only", default="pickup,floor,throughput,idle")
    args = ap.parse_args()
    which = set(args.only.split(","))
    settings = dict(FAST_SETTINGS) if args.fast else {"max_connections": "100"}
    server = EmbeddedPostgres(settings=settings)
    logdir = Path(tempfile.mkdtemp(prefix="reactor-bench-"))
    results: dict[str, dict[str, float]] = {}
    try:
        with psycopg.connect(server.start(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE reactor_bench")
        dsn = server.dsn_for("reactor_bench")
        migrate_up(dsn)
        without_render_cache(dsn)
        print(f"PostgreSQL: {'fsync off (--fast)' if args.fast else 'durable defaults'}; "
              f"{os.cpu_count()} CPUs; logs in {logdir}")
        procs = Procs(dsn, logdir)
        procs.start_orchestrator()
        procs.start_reactor()
        wait_reactor_ready(dsn)
        try:
            if "idle" in which:
                secs = 60.0 if args.quick else 120.0
                results["idle"] = r = bench_idle(dsn, secs, server.log_file)
                print(f"idle: {r['transactions']:.0f} transactions in {secs:.0f} s by the server log "
                      f"= {r['per_minute']:.1f}/min (goal <= 6); pg_stat_database counted "
                      f"{r['stats_transactions']:.0f} ({r['stats_per_minute']:.1f}/min)")
            if "pickup" in which:
                n = 300 if args.quick else 1500
                results["pickup"] = r = bench_pickup(dsn, procs, n, 50.0)
                print(f"pickup at 50 jobs/s ({r['n']:.0f} jobs): p50 {r['p50_ms']:.2f} ms, "
                      f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms (goal p50 <= 2.5, p99 <= 8)")
            if "floor" in which:
                n = 300 if args.quick else 1500
                results["floor"] = r = bare_pickup.measure(dsn, procs.orch_url, n, 50.0)
                print(f"floor (bench/bare_pickup.py) at 50 jobs/s ({r['n']:.0f} jobs): p50 {r['p50_ms']:.2f} ms, "
                      f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms")
            if "throughput" in which:
                n = 2000 if args.quick else 5000
                results["throughput"] = r = bench_throughput(dsn, procs, n)
                print(f"throughput: {r['n']:.0f} jobs in {r['seconds']:.2f} s = {r['jobs_per_s']:.0f} jobs/s, "
                      f"max in flight {r['max_in_flight']:.0f} (goal >= 1000 jobs/s)")
        finally:
            procs.stop()
    finally:
        server.destroy()
    print("\nsummary")
    if "pickup" in results:
        r = results["pickup"]
        ok = r["p50_ms"] <= 2.5 and r["p99_ms"] <= 8
        print(f"  pickup p50/p99   {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms   {'PASS' if ok else 'FAIL'}")
        if "floor" in results:
            f = results["floor"]
            print(f"  floor p50/p99    {f['p50_ms']:.2f} / {f['p99_ms']:.2f} ms   (reactor / floor: "
                  f"{r['p50_ms'] / f['p50_ms']:.2f} at p50, {r['p99_ms'] / f['p99_ms']:.2f} at p99)")
    if "throughput" in results:
        r = results["throughput"]
        print(f"  throughput       {r['jobs_per_s']:.0f} jobs/s        {'PASS' if r['jobs_per_s'] >= 1000 else 'FAIL'}")
    if "idle" in results:
        r = results["idle"]
        print(f"  idle             {r['per_minute']:.1f} tx/min         {'PASS' if r['per_minute'] <= 6 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
