"""Fleet: one reactor against three on the same workload, on one database.

    python3 bench/fleet_bench.py [--jobs 6000] [--limit 10] [--repeats 3] [--reactors 1,3] [--fast]

Starts a private PostgreSQL (pg_stat_statements loaded, track_functions = pl) and the orchestrator
double answering at once. Each run gets a fresh database cloned from one migrated template, starts
its reactors as separate processes (``python -m reactor run --listen``, as deployed), queues
``--jobs`` jobs with one INSERT under ``max_concurrent_renders = max_manim_renders = --limit``, and
waits for the last to complete; then measures pickup at 50 jobs/s (``--pickup`` jobs) on the same
reactors. Within a repeat the counts run one after another, their order alternating from repeat to
repeat (1, 3 then 3, 1), so that a busy minute of the shared machine falls on both alike. Per run:

* throughput: jobs/s from the INSERT to the last completion; pickup p50/p99 (INSERT's return to the
  double's ``POST /render``, as bench/pickup.py measures it);
* claims: round trips that asked for jobs, those that found none, and the notifications from other
  reactors that asked for a claim (each reactor's ``/metrics``: ``reactor_claims``,
  ``reactor_claim_wakeups``); calls of the reactor's round trip, ``reactor.run_cycle``, with their
  mean time and the function's own (pg_stat_statements, pg_stat_user_functions);
* where the reactors' database sessions spend their time: pg_stat_activity sampled every 10 ms,
  each sample of a reactor session counted as running, waiting for the claim lock (7240513002), the
  journal lock (7240513004), the NOTIFY commit lock (``Lock:object``), WAL (a commit's flush), or
  idle (waiting for its reactor); CPU seconds of the reactor processes and of their backends;
* who did the work: the jobs each reactor claimed and its claims (the journal's "started" events by
  actor), and how long a job stayed in processing (its "started" event to its "completed" one), p50;
* checks: the number of jobs in processing, sampled with the rest, never above the limit; the
  double never had more than the limit in flight; no job rendered twice (its request log), every
  job rendered; every reactor's feed read up to the same last seq, the log's (``reactor_feed_seq``).

``--max-inflight N`` caps each reactor of a run with more than one (``reactor run --max-inflight``):
with it, the work is shared out instead of going where the room is freed (see bench/README.md).

The machine is shared: compare counts within a repeat, not across runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pickup  # noqa: E402
from pickup import http_json  # noqa: E402
from reactor_bench import Procs, free_port, stop_processes  # noqa: E402

from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres  # noqa: E402
from reactor.db.migrations import migrate_up  # noqa: E402

CLAIM_LOCK = 7240513002
JOURNAL_LOCK = 7240513004
TICK = os.sysconf("SC_CLK_TCK")

SAMPLE_SQL = """
SELECT a.application_name, a.state, a.wait_event_type, a.wait_event,
       (l.classid::bigint << 32) | l.objid::bigint AS lock_key,
       (SELECT count(*) FROM reactor.jobs WHERE status = 'processing') AS processing
  FROM pg_stat_activity a
  LEFT JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted AND l.locktype = 'advisory'
 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def scrape(port: int) -> dict[str, float]:
    """A reactor's /metrics, name{labels} -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Sampler(threading.Thread):
    """pg_stat_activity and the jobs in processing, every ``every_s``, until stopped."""

    def __init__(self, dsn: str, every_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.every_s = every_s
        self.stop_event = threading.Event()
        self.states: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.max_processing = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop_event.is_set():
                rows = conn.execute(SAMPLE_SQL).fetchall()
                self.samples += 1
                for app, state, wtype, wevent, key, processing in rows:
                    self.max_processing = max(self.max_processing, int(processing or 0))
                    if app and app.startswith("reactor ") and app != "reactor listener":
                        self.states[classify(state, wtype, wevent, key)] += 1
                time.sleep(self.every_s)


def classify(state: str | None, wtype: str | None, wevent: str | None, key: int | None) -> str:
    if state != "active":
        return "idle"
    if key == CLAIM_LOCK:
        return "claim lock"
    if key == JOURNAL_LOCK:
        return "journal lock"
    if wtype is None:
        return "running"
    if wtype == "Lock" and wevent == "object":
        return "notify commit"
    if wevent in ("WALWrite", "WALSync", "WALInsert") or (wtype == "IO" and wevent and wevent.startswith("WAL")):
        return "wal"
    return f"{wtype}:{wevent}"


def start_reactors(
    dsn: str, orch_url: str, n: int, logdir: Path, feed: bool = True, max_inflight: int | None = None,
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    for i in range(n):
        port = free_port()
        log = open(logdir / f"reactor-{i}.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "reactor", "--log-level", "WARNING", "run", "--dsn", dsn,
             "--orchestrator-url", orch_url, "--reactor-id", f"fleet-{i}",
             *(["--max-inflight", str(max_inflight)] if max_inflight else []),
             *(["--listen", f"127.0.0.1:{port}"] if feed else [])],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "REACTOR_JWT_SECRET": "bench-secret-bench-secret-bench-secret"},
        ))
        if feed:
            ports.append(port)
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'reactor listener' AND query ILIKE 'listen%%'").fetchone()
            if row and row[0] >= n:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                stop_processes(procs)
                raise RuntimeError(f"the reactors did not all start LISTENing (logs in {logdir})")
            time.sleep(0.05)
    for port in ports:  # the feed is up (its pump follows the log)
        while True:
            try:
                scrape(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    return procs, ports


def backend_pids(conn: psycopg.Connection[Any]) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'reactor %%' AND pid <> pg_backend_pid()").fetchall()]


def one_run(server: EmbeddedPostgres, procs: Procs, n_reactors: int, args: argparse.Namespace,
            run_no: int, logdir: Path) -> dict[str, Any]:
    dbname = f"fleet_{run_no}"
    with psycopg.connect(server.dsn_for("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE fleet_template").format(sql.Identifier(dbname)))
    dsn = server.dsn_for(dbname)
    reactors, ports = start_reactors(dsn, procs.orch_url, n_reactors, logdir, not args.no_feed,
                                     args.max_inflight if n_reactors > 1 else None)
    r: dict[str, Any] = {"reactors": n_reactors}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE job_queue_config SET max_concurrent_renders = %s, max_manim_renders = %s",
                          (args.limit, args.limit))
            time.sleep(0.5)  # the reactors read the new limits
            http_json(f"{procs.orch_url}/reset", "POST", {})
            conn.execute("SELECT pg_stat_statements_reset()")
            conn.execute("SELECT pg_stat_reset()")
            # every run starts with no dirty buffers: a checkpoint that falls in one run and not in the
            # other of a repeat (durable defaults, a new database each run) is not a difference of theirs
            conn.execute("CHECKPOINT")
            backends = backend_pids(conn)
            cpu0 = [cpu_seconds(p.pid) for p in reactors], [cpu_seconds(p) for p in backends]
            sampler = Sampler(dsn)
            sampler.start()
            t0 = time.perf_counter()
            conn.execute(
                "INSERT INTO jobs (job_type, payload) SELECT 'topic_short', jsonb_build_object('topic', 't' || g) "
                "FROM generate_series(1, %s) g", (args.jobs,))
            while True:
                row = conn.execute("SELECT completed FROM reactor.counters").fetchone()
                assert row
                if row[0] >= args.jobs:
                    break
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"only {row[0]} of {args.jobs} completed in 600 s")
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            sampler.stop_event.set()
            sampler.join()
            r["seconds"] = elapsed
            r["jobs_per_s"] = args.jobs / elapsed
            r["cpu_reactors"] = sum(cpu_seconds(p.pid) for p in reactors) - sum(cpu0[0])
            r["cpu_backends"] = sum(cpu_seconds(p) for p in backends) - sum(cpu0[1])
            r["states"] = sampler.states
            r["samples"] = sampler.samples
            r["max_processing"] = sampler.max_processing
            stats = http_json(f"{procs.orch_url}/stats")
            reqs = http_json(f"{procs.orch_url}/requests")
            seen = collections.Counter(q["job_id"] for q in reqs)
            r["max_in_flight"] = stats["max_in_flight"]
            r["rendered_twice"] = sum(1 for c in seen.values() if c > 1)
            r["rendered"] = len(seen)
            r["statements"] = conn.execute(
                "SELECT calls, total_exec_time / greatest(calls, 1) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query LIKE '%%reactor.run_cycle(%%' ORDER BY calls DESC LIMIT 1").fetchone()
            r["functions"] = {f: (c, t) for f, c, t in conn.execute(
                "SELECT funcname, calls, self_time FROM pg_stat_user_functions WHERE schemaname = 'reactor' "
                "AND funcname = 'run_cycle'")}
            r["by_reactor"] = conn.execute(
                "SELECT actor, count(*), count(DISTINCT at) FROM reactor.events WHERE kind = 'started' "
                "GROUP BY actor ORDER BY actor").fetchall()
            held = conn.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM f.at - s.at) * 1000) "
                "FROM reactor.events s JOIN reactor.events f ON f.job_id = s.job_id AND f.kind = 'completed' "
                "WHERE s.kind = 'started'").fetchone()
            r["held_ms"] = float(held[0]) if held and held[0] is not None else float("nan")
            notices = conn.execute("SELECT count(*) FROM reactor.events").fetchone()
            last_seq = conn.execute("SELECT last_seq FROM reactor.counters").fetchone()
            assert notices and last_seq
            r["events"] = int(notices[0])
            metrics = [scrape(p) for p in ports]
            r["claims"] = sum(m.get('reactor_claims_total{result="jobs"}', 0) for m in metrics)
            r["claims_empty"] = sum(m.get('reactor_claims_total{result="empty"}', 0) for m in metrics)
            r["wakeups"] = sum(m.get("reactor_claim_wakeups_total", 0) for m in metrics)
            # every reactor's feed reads the log up to its end. A feed with no client does not hear the
            # busy reactor's cycles (reactor_log, migration 0017): it reads the log's end at its next
            # heartbeat (15 s by default) at the latest
            deadline = time.monotonic() + 25
            while True:
                seqs = [int(scrape(p).get("reactor_feed_seq", -1)) for p in ports]
                if not ports or all(s == last_seq[0] for s in seqs) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            r["feed_seqs"], r["last_seq"] = seqs, int(last_seq[0])
        if args.pickup:
            p = pickup.measure(
                dsn, procs.orch_url, args.pickup, 50.0,
                # topics of their own: t1..t<jobs> were rendered above, and the render cache (24 h for
                # topic_short) would complete those without a render, leaving one sample
                insert_sql="INSERT INTO jobs (job_type, payload) VALUES "
                           "('topic_short', jsonb_build_object('topic', 'pickup-' || (%s::jsonb ->> 'topic'))) "
                           "RETURNING id",
                warm_sql="INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"warm\"}')",
            )
            r["pickup_p50"], r["pickup_p99"] = p["p50_ms"], p["p99_ms"]
    finally:
        stop_processes(reactors)
    with psycopg.connect(server.dsn_for("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
    return r


def report(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    ok = (r["max_processing"] <= args.limit and r["max_in_flight"] <= args.limit and r["rendered_twice"] == 0
          and r["rendered"] == args.jobs and all(s == r["last_seq"] for s in r["feed_seqs"]))
    states: collections.Counter[str] = r["states"]
    busy = sum(v for k, v in states.items() if k != "idle") or 1
    where = ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in states.most_common() if k != "idle")
    fn = r["functions"]
    own_calls, own_ms = fn.get("run_cycle", (0, 0.0))
    stmt = r["statements"] or (0, 0.0)
    lines = [
        f"{r['reactors']} reactor{'s' if r['reactors'] > 1 else ' '}: {args.jobs} jobs in {r['seconds']:.2f} s = "
        f"{r['jobs_per_s']:.0f} jobs/s; pickup p50 {r.get('pickup_p50', float('nan')):.2f} ms, "
        f"p99 {r.get('pickup_p99', float('nan')):.2f} ms",
        f"    claims {r['claims'] + r['claims_empty']:.0f}, found nothing {r['claims_empty']:.0f}; "
        f"wake-ups from others' notices {r['wakeups']:.0f} for {r['events']} events; "
        f"run_cycle {stmt[0]} calls, {stmt[1]:.2f} ms mean, {own_ms / max(own_calls, 1):.2f} ms self",
        f"    reactor sessions while active ({busy} samples): {where}; idle {states['idle']}",
        f"    CPU s: reactors {r['cpu_reactors']:.2f}, their backends {r['cpu_backends']:.2f}",
        "    work: " + ", ".join(f"{a.removeprefix('reactor:')} {n} jobs in {c} claims" for a, n, c in r["by_reactor"])
        + f"; a job in processing p50 {r['held_ms']:.1f} ms",
        f"    checks: processing <= {r['max_processing']}, double in flight <= {r['max_in_flight']} "
        f"(limit {args.limit}); rendered {r['rendered']}, twice {r['rendered_twice']}; feed seqs "
        f"{r['feed_seqs']} (log {r['last_seq']}): {'PASS' if ok else 'FAIL'}",
    ]
    r["ok"] = ok
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6000)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reactors", default="1,3", help="reactor counts to compare, in the first repeat's order")
    ap.add_argument("--pickup", type=int, default=300, help="jobs for the pickup figure at 50 jobs/s (0: none)")
    ap.add_argument("--no-feed", action="store_true",
                    help="reactors without --listen (no feed, no /metrics: no claim counts, no seq check)")
    ap.add_argument("--fast", action="store_true", help="PostgreSQL with fsync off (default: durable defaults)")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="each reactor's own cap in runs of more than one (default: none, the fleet's limit)")
    args = ap.parse_args()
    counts = [int(x) for x in args.reactors.split(",")]
    settings = dict(FAST_SETTINGS) if args.fast else {"max_connections": "100"}
    settings.update({"shared_preload_libraries": "pg_stat_statements", "track_functions": "pl",
                     "max_connections": "200"})
    server = EmbeddedPostgres(settings=settings)
    logdir = Path(tempfile.mkdtemp(prefix="reactor-fleet-"))
    results: list[tuple[int, dict[str, Any]]] = []
    try:
        with psycopg.connect(server.start(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE fleet_template")
        migrate_up(server.dsn_for("fleet_template"))
        with psycopg.connect(server.dsn_for("fleet_template"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        print(f"PostgreSQL: {'fsync off (--fast)' if args.fast else 'durable defaults'}; {os.cpu_count()} CPUs; "
              f"{args.jobs} jobs, limit {args.limit}; logs in {logdir}", flush=True)
        procs = Procs(server.dsn_for("fleet_template"), logdir)
        procs.start_orchestrator()
        try:
            run_no = 0
            for rep in range(args.repeats):
                order = counts if rep % 2 == 0 else list(reversed(counts))
                print(f"\nrepeat {rep + 1} (order {', '.join(map(str, order))})", flush=True)
                for n in order:
                    run_no += 1
                    r = one_run(server, procs, n, args, run_no, logdir)
                    results.append((rep, r))
                    print("\n".join(report(r, args)), flush=True)
        finally:
            procs.stop()
    finally:
        server.destroy()
    print("\nsummary (jobs/s; pickup p50/p99 ms)")
    for rep in range(args.repeats):
        rs = {r["reactors"]: r for q, r in results if q == rep}
        parts = [f"{n}: {rs[n]['jobs_per_s']:.0f} ({rs[n].get('pickup_p50', float('nan')):.2f}/"
                 f"{rs[n].get('pickup_p99', float('nan')):.2f})" for n in counts if n in rs]
        ratio = ""
        if len(counts) == 2 and all(n in rs for n in counts):
            ratio = f"   {counts[1]}/{counts[0]} = {rs[counts[1]]['jobs_per_s'] / rs[counts[0]]['jobs_per_s']:.2f}"
        print(f"  repeat {rep + 1}: " + ", ".join(parts) + ratio)
    bad = [r for _, r in results if not r["ok"]]
    print(f"  checks: {'PASS' if not bad else f'FAIL in {len(bad)} runs'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
