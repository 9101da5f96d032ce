#!/usr/bin/env python3
"""The database's share of the reactor's cycle, by schema version (issue 18, the quiet figures).

    python3 bench/cycle_bench.py [--jobs 3000] [--batch 1] [--repeats 2] [--versions 6,7,14,15] [--reactor-call]
    python3 bench/cycle_bench.py --lone [--jobs 600] [--repeats 3] [--versions 6,17,18]

The reactor writes each outcome and claims again in one call: ``reactor.finish_and_claim`` to 0012,
``finish_settle_and_claim`` (which calls it and then ``claim_jobs``) from 0013, ``run_cycle`` from
0016. This bench makes ``finish_and_claim`` at every version, or with ``--reactor-call`` what the
reactor calls at that version, alone, without the reactor, the orchestrator or HTTP: on one connection,
``--jobs`` Manim doubts queued by one INSERT (limits 10 and 10), then the loop "write ``--batch``
outcomes as completed and claim as many" until every job is done, each call its own transaction.
(``--batch 1, 2, 5, 10`` shows what a call costs once and what each further job adds.)
It prints, per schema version, jobs/s, calls/s, the time of the call and of its COMMIT (the WAL
flush), and WAL bytes per job.

Each version is this tree's migrations applied and then rolled back to that version (the rollbacks
are tested to give back exactly what the earlier migrations made), in a database cloned from a
template per version; the versions alternate within each repeat, so that load from elsewhere on the
machine falls on all alike. A private PostgreSQL with durable settings (fsync on, as in production).
No bound: a figure to compare versions by, in one run.

``--lone`` measures what a pickup costs the database instead: one job inserted, then the reactor's
call that claims it alone (nothing to write, room for 10: an idle reactor woken by the INSERT), then
the call that writes its outcome alone (no claim), one job at a time; the median of each call and of
its COMMIT, per version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reactor.db.embedded import EmbeddedPostgres  # noqa: E402
from reactor.db.migrations import discover, migrate_down, migrate_up  # noqa: E402

CYCLE = sql.SQL("SELECT written, id, attempt FROM reactor.finish_and_claim(%s::jsonb, 'bench', %s, "
                "interval '5 minutes')")
# what the reactor calls (sql/queries.sql): from 0013 the render cache settled between outcomes and
# claim; from 0016 the same in one function with one journal write
SETTLE = sql.SQL("SELECT written, id, attempt FROM reactor.finish_settle_and_claim(%s::jsonb, 'bench', %s, "
                 "interval '5 minutes')")
RUN_CYCLE = sql.SQL("SELECT written, id, attempt FROM reactor.run_cycle(%s::jsonb, 'bench', %s, "
                    "interval '5 minutes')")


def template(admin: psycopg.Connection[Any], server: EmbeddedPostgres, version: int) -> str:
    name = f"cycle_v{version}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate_up(server.dsn_for(name))
    migrate_down(server.dsn_for(name), to_version=version)
    return name


def fresh_run_db(admin: psycopg.Connection[Any], server: EmbeddedPostgres, tpl: str) -> str:
    """A database cloned from the version's template, limits 10 and 10; returns its DSN."""
    admin.execute("DROP DATABASE IF EXISTS cycle_run")
    admin.execute(sql.SQL("CREATE DATABASE cycle_run TEMPLATE {}").format(sql.Identifier(tpl)))
    dsn = server.dsn_for("cycle_run")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE job_queue_config SET max_concurrent_renders = 10, max_manim_renders = 10")
    return dsn


def run(admin: psycopg.Connection[Any], server: EmbeddedPostgres, tpl: str, jobs: int, batch: int,
        call: sql.SQL = CYCLE) -> dict[str, float]:
    with psycopg.connect(fresh_run_db(admin, server, tpl), autocommit=True) as c:
        c.execute("INSERT INTO jobs (job_type, payload) "
                  "SELECT 'doubt', jsonb_build_object('question', 'q' || g) FROM generate_series(1, %s) g", (jobs,))
        c.execute("CHECKPOINT")
        inflight: list[tuple[Any, int]] = []
        spent = {"call": 0.0, "commit": 0.0}

        def cycle(outcomes: list[dict[str, Any]], claim: int) -> None:
            t1 = time.perf_counter()
            c.execute("BEGIN")
            rows = c.execute(call, (json.dumps(outcomes), claim)).fetchall()
            t2 = time.perf_counter()
            c.execute("COMMIT")
            spent["call"] += t2 - t1
            spent["commit"] += time.perf_counter() - t2
            inflight.extend((r[1], r[2]) for r in rows if not r[0])

        row = c.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert row is not None
        lsn = row[0]
        t0 = time.perf_counter()
        cycle([], 10)
        done = calls = 0
        while inflight:
            now, inflight[:] = inflight[:batch], inflight[batch:]
            cycle([{"id": str(i), "attempt": a, "status": "completed", "retry_count": 0, "delay_s": 0,
                    "result": {"video_url": f"https://cdn.example/{i}.mp4"}} for i, a in now], len(now))
            done += len(now)
            calls += 1
        elapsed = time.perf_counter() - t0
        row = c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn, count(*) FILTER (WHERE status = 'completed') "
                        "FROM reactor.jobs", (str(lsn),)).fetchone()
        assert row is not None
        if row[1] != jobs or done != jobs:
            raise SystemExit(f"cycle_bench: {row[1]} of {jobs} jobs completed ({done} written)")
    return {"jobs_s": done / elapsed, "calls_s": calls / elapsed, "call_ms": spent["call"] / calls * 1000,
            "commit_ms": spent["commit"] / calls * 1000, "wal_b": float(row[0]) / done}


def run_lone(admin: psycopg.Connection[Any], server: EmbeddedPostgres, tpl: str, jobs: int,
             call: sql.SQL) -> dict[str, float]:
    dsn = fresh_run_db(admin, server, tpl)
    with psycopg.connect(dsn, autocommit=True) as c, psycopg.connect(dsn, autocommit=True) as r:
        c.execute("CHECKPOINT")
        times: dict[str, list[float]] = {"claim": [], "claim_commit": [], "outcome": [], "outcome_commit": []}

        def timed(name: str, outcomes: list[dict[str, Any]], claim: int) -> list[tuple[Any, ...]]:
            t1 = time.perf_counter()
            r.execute("BEGIN")
            rows = r.execute(call, (json.dumps(outcomes), claim)).fetchall()
            t2 = time.perf_counter()
            r.execute("COMMIT")
            times[name].append(t2 - t1)
            times[f"{name}_commit"].append(time.perf_counter() - t2)
            return rows

        warm = 50
        for i in range(jobs + warm):
            c.execute("INSERT INTO jobs (job_type, payload) VALUES ('doubt', %s)", (json.dumps({"question": f"q{i}"}),))
            [(_, job, attempt)] = [row for row in timed("claim", [], 10) if not row[0]]
            timed("outcome", [{"id": str(job), "attempt": attempt, "status": "completed", "retry_count": 0,
                               "delay_s": 0, "result": {"video_url": f"https://cdn.example/{job}.mp4"}}], 0)
            if i == warm - 1:
                for xs in times.values():
                    xs.clear()
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=1, help="outcomes written (and jobs claimed) per call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reactor-call", action="store_true",
                    help="call what the reactor calls at each version (finish_settle_and_claim from 0013, "
                         "run_cycle from 0016), not finish_and_claim")
    ap.add_argument("--versions", default=None, help="schema versions, comma-separated (default 6,7,8,14,latest)")
    ap.add_argument("--lone", action="store_true",
                    help="a pickup's share instead: claim one job alone, then write its outcome alone "
                         "(what the reactor calls at each version; --jobs defaults to 600)")
    args = ap.parse_args()
    if args.lone:
        args.reactor_call = True
    latest = max(m.version for m in discover())
    versions = ([int(v) for v in args.versions.split(",")] if args.versions
                else sorted({6, 7, 8, latest - 1, latest}))
    server = EmbeddedPostgres(settings={"max_connections": "20", "shared_buffers": "128MB"})
    dsn = server.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            templates = {v: template(admin, server, v) for v in versions}
            if args.lone:
                return lone(admin, server, templates, versions, latest, args)
            print(f"cycle_bench: {args.jobs} jobs, {args.batch} outcome(s) and claim(s) per call, one connection, "
                  f"durable; versions {', '.join(map(str, versions))} (latest {latest})")
            print(f"{'repeat':>6} {'version':>7} {'jobs/s':>8} {'calls/s':>8} {'call ms':>8} {'commit ms':>9} "
                  f"{'WAL B/job':>9}")
            for r in range(1, args.repeats + 1):
                for v in versions:
                    call = (CYCLE if not args.reactor_call or v < 13 else SETTLE if v < 16 else RUN_CYCLE)
                    f = run(admin, server, templates[v], args.jobs, args.batch, call)
                    print(f"{r:>6} {v:>7} {f['jobs_s']:>8.1f} {f['calls_s']:>8.1f} {f['call_ms']:>8.2f} "
                          f"{f['commit_ms']:>9.2f} {f['wal_b']:>9.0f}", flush=True)
    finally:
        server.stop()
    return 0


def lone(admin: psycopg.Connection[Any], server: EmbeddedPostgres, templates: dict[int, str],
         versions: list[int], latest: int, args: argparse.Namespace) -> int:
    jobs = args.jobs if args.jobs != 3000 else 600
    print(f"cycle_bench --lone: {jobs} jobs one at a time (insert, claim it alone, write its outcome alone), "
          f"durable; versions {', '.join(map(str, versions))} (latest {latest}); medians, ms")
    print(f"{'repeat':>6} {'version':>7} {'claim':>7} {'commit':>7} {'outcome':>8} {'commit':>7}")
    for r in range(1, args.repeats + 1):
        for v in (versions if r % 2 else versions[::-1]):
            call = CYCLE if v < 13 else SETTLE if v < 16 else RUN_CYCLE
            f = run_lone(admin, server, templates[v], jobs, call)
            print(f"{r:>6} {v:>7} {f['claim']:>7.3f} {f['claim_commit']:>7.3f} {f['outcome']:>8.3f} "
                  f"{f['outcome_commit']:>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
