#!/usr/bin/env python3
"""Queue positions at depth (issue 19): the ``jobs`` view of this tree against the one before it.

    python3 bench/positions_bench.py [--quick] [--fast] [--before REF] [--timeout 60]
                                     [--queued 100000] [--finished 1000000] [--pinned 30000]

Starts a private PostgreSQL (durable, as in production; fsync off under ``--fast``) and builds four
databases: for each of the two schemas, "before" (the migrations of git revision ``--before``,
bd72430 by default: positions counted per row) and "after" (this tree's), one database with
``--queued`` queued jobs and a copy of it (``CREATE DATABASE ... TEMPLATE``, so the same jobs) that
also holds ``--finished`` completed jobs a month old. The queued jobs are 20% high, 50% medium, 30%
low priority, a third of them Manim renders, created over the last hour.

Figures, the four databases sampled in alternating blocks so that load from elsewhere on the machine
falls on all alike:

* all positions in order: ``SELECT id, priority, status, queue_position, created_at FROM jobs
  WHERE status = 'queued' ORDER BY queue_position``, every row fetched, best of 5 (checked against a
  recount); with ``statement_timeout = --timeout`` s, else "did not finish in N s";
* one job's position: ``SELECT queue_position FROM jobs WHERE id = $1`` for ids spread evenly
  through the queue, p50 / p99 (each checked);
* single-row ``INSERT INTO jobs ... RETURNING id, status, queue_position``, p50 / p99, mixed
  priorities and renderers; every 10th returned position checked against a recount;
* for context (no bound): PostgREST's ``?order=queue_position&limit=50`` on the whole table, with
  ``--context-timeout``.

With ``--pinned N`` (no bound): then, in each side's queued-only database, lookups at the head and in
the middle, INSERTs and the listing (``--context-timeout``), before and after N jobs were claimed and
completed while a REPEATABLE READ transaction pinned the MVCC horizon (what a pg_dump does).

Bounds (issue 19), for the after side: all positions in order <= 2 s; one position p99 <= 20 ms;
INSERT p50 <= 10 ms and every checked RETURNING position right; and with the finished jobs added,
none of the three (listing time, position p50, INSERT p50) moves by more than 20%. Exit status 1
when one fails. About 7 minutes in full (loading the finished jobs is much of it), 1 with --quick.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sql_bench import percentile  # noqa: E402

from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres  # noqa: E402
from reactor.db.migrations import Migration, discover, migrate_up  # noqa: E402

Conn = psycopg.Connection[Any]

LIST_SQL = ("SELECT id, priority, status, queue_position, created_at FROM jobs "
            "WHERE status = 'queued' ORDER BY queue_position")
POSITION_SQL = "SELECT queue_position FROM jobs WHERE id = %s"
INSERT_SQL = ("INSERT INTO jobs (job_type, priority, payload) VALUES (%s, %s, %s) "
              "RETURNING id, status, queue_position")
CONTEXT_SQL = "SELECT id, queue_position FROM jobs ORDER BY queue_position LIMIT 50"
ORACLE_SQL = "SELECT id FROM reactor.jobs WHERE status = 'queued' ORDER BY priority_rank, created_at, job_no"
# the recount of one job's position: 1 + the queued jobs before it
RECOUNT_SQL = """
SELECT 1 + count(*) FROM reactor.jobs q, reactor.jobs j
 WHERE j.id = %s AND q.status = 'queued'
   AND (q.priority_rank, q.created_at, q.job_no) < (j.priority_rank, j.created_at, j.job_no)
"""
LOAD_QUEUED_SQL = """
INSERT INTO jobs (job_type, priority, payload, created_at)
SELECT (ARRAY['doubt', 'topic_short', 'daily_ca'])[1 + g %% 3],
       CASE WHEN g %% 10 < 2 THEN 'high' WHEN g %% 10 < 7 THEN 'medium' ELSE 'low' END,
       jsonb_build_object('question', 'q ' || g, 'topic', 't ' || g, 'date', '2026-12-01'),
       now() - make_interval(secs => (%(total)s::int - g) * 3600.0 / %(total)s::int)
  FROM generate_series(%(first)s::int, %(last)s::int) g
"""
LOAD_FINISHED_SQL = """
INSERT INTO jobs (job_type, status, payload, result, created_at, started_at, completed_at)
SELECT 'topic_short', 'completed', jsonb_build_object('topic', 'old ' || g),
       jsonb_build_object('video_url', 'https://cdn.example/v/' || g || '.mp4'),
       now() - interval '30 days', now() - interval '30 days' + interval '5 s',
       now() - interval '30 days' + interval '65 s'
  FROM generate_series(1, %s::int) g
"""

GOAL_LIST_S = 2.0
GOAL_POSITION_MS = 20.0
GOAL_INSERT_P50_MS = 10.0
GOAL_MOVE = 0.20
BLOCK = 25  # samples taken on one database before switching to the other


@dataclass(frozen=True)
class Plan:
    queued: int
    finished: int
    ids: int
    inserts: int
    warmup: int
    list_rounds: int


FULL = Plan(queued=100_000, finished=1_000_000, ids=300, inserts=400, warmup=20, list_rounds=5)
QUICK = Plan(queued=10_000, finished=100_000, ids=100, inserts=100, warmup=10, list_rounds=3)


@dataclass
class Figures:
    """What one database measured."""

    label: str
    list_s: list[float] = field(default_factory=list)
    list_timeout_s: float | None = None  # the listing did not finish within this
    list_right: bool = True
    position_ms: list[float] = field(default_factory=list)
    positions_right: bool = True
    insert_ms: list[float] = field(default_factory=list)
    returning_checked: int = 0
    returning_wrong: int = 0
    context_s: float | None = None
    context_timeout_s: float | None = None

    def listing(self) -> str:
        if self.list_timeout_s is not None:
            return f"did not finish in {self.list_timeout_s:g} s"
        return f"{min(self.list_s):.3f} s" + ("" if self.list_right else " WRONG")

    def context(self) -> str:
        if self.context_timeout_s is not None:
            return f"did not finish in {self.context_timeout_s:g} s"
        return "-" if self.context_s is None else f"{self.context_s:.3f} s"


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def ms(values: list[float], pct: float) -> float:
    return percentile(values, pct) * 1000


# -- schemas and data -------------------------------------------------------------------------------


def migrations_at(ref: str, into: Path) -> list[Migration]:
    """The migrations (and rollbacks) of git revision ``ref``, written under ``into``."""
    for folder in ("migrations", "rollback"):
        (into / folder).mkdir(parents=True)
        names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", ref, f"sql/{folder}/"],
                               check=True, capture_output=True, text=True).stdout.split()
        for name in names:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{name}"],
                                  check=True, capture_output=True).stdout
            (into / folder / Path(name).name).write_bytes(text)
    return discover(into)


def create_db(admin: Conn, name: str, template: str | None = None) -> None:
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
    admin.execute(query)


def load_queued(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for first in range(1, n + 1, 20_000):
            conn.execute(LOAD_QUEUED_SQL, {"total": n, "first": first, "last": min(n, first + 19_999)})
        conn.execute("VACUUM ANALYZE reactor.jobs")


def load_finished(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = 0
        while done < n:
            step = min(100_000, n - done)
            conn.execute(LOAD_FINISHED_SQL, (step,))
            done += step
        conn.execute("VACUUM ANALYZE reactor.jobs")
        conn.execute("VACUUM ANALYZE reactor.events")


# -- measurements -----------------------------------------------------------------------------------


@contextmanager
def timeout(conn: Conn, seconds: float) -> Iterator[None]:
    conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(f"{int(seconds * 1000)}ms")))
    try:
        yield
    finally:
        conn.execute("RESET statement_timeout")


@dataclass
class Db:
    """One database under measurement: its connection, its queue in order (the recount), its figures."""

    conn: Conn
    oracle: list[uuid.UUID]
    fig: Figures


def alternate(dbs: list[Db], n: int, one: Callable[[Db, int], None]) -> None:
    """``one(db, i)`` for i in 0..n-1 on each database, in alternating blocks."""
    for start in range(0, n, BLOCK):
        for db in dbs:
            for i in range(start, min(n, start + BLOCK)):
                one(db, i)


def measure_listing(dbs: list[Db], plan: Plan, limit_s: float) -> None:
    for _ in range(plan.list_rounds):
        for db in dbs:
            fig = db.fig
            if fig.list_timeout_s is not None:
                continue
            with timeout(db.conn, limit_s):
                t = time.perf_counter()
                try:
                    rows = db.conn.execute(LIST_SQL).fetchall()
                except psycopg.errors.QueryCanceled:
                    fig.list_timeout_s = limit_s
                    continue
                fig.list_s.append(time.perf_counter() - t)
            fig.list_right = fig.list_right and [r[0] for r in rows] == db.oracle and [
                r[3] for r in rows] == list(range(1, len(db.oracle) + 1))


def measure_positions(dbs: list[Db], plan: Plan) -> None:
    n = len(dbs[0].oracle)
    picks = [min(n - 1, (2 * i + 1) * n // (2 * plan.ids)) for i in range(plan.ids)]

    def one(db: Db, i: int) -> None:
        place = picks[i]
        t = time.perf_counter()
        row = db.conn.execute(POSITION_SQL, (db.oracle[place],)).fetchone()
        db.fig.position_ms.append(time.perf_counter() - t)
        db.fig.positions_right = db.fig.positions_right and row == (place + 1,)

    for db in dbs:  # warm-up, not recorded
        for i in range(plan.warmup):
            db.conn.execute(POSITION_SQL, (db.oracle[picks[i * len(picks) // plan.warmup]],)).fetchone()
    alternate(dbs, plan.ids, one)


def measure_inserts(dbs: list[Db], plan: Plan) -> None:
    kinds = [(job_type, priority) for priority in ("high", "medium", "low", "medium", "low")
             for job_type in ("doubt", "topic_short", "daily_ca")]

    def insert(conn: Conn, i: int) -> tuple[uuid.UUID, int]:
        job_type, priority = kinds[i % len(kinds)]
        payload = psycopg.types.json.Jsonb({"question": f"bench {i}", "topic": f"bench {i}", "date": "2026-12-01"})
        row = conn.execute(INSERT_SQL, (job_type, priority, payload)).fetchone()
        assert row is not None and row[1] == "queued"
        return row[0], int(row[2])

    def one(db: Db, i: int) -> None:
        t = time.perf_counter()
        job_id, position = insert(db.conn, i)
        db.fig.insert_ms.append(time.perf_counter() - t)
        if i % 10 == 0:  # checked after the timer, against a recount
            db.fig.returning_checked += 1
            db.fig.returning_wrong += db.conn.execute(RECOUNT_SQL, (job_id,)).fetchone() != (position,)

    for db in dbs:
        for i in range(plan.warmup):
            insert(db.conn, i)
    alternate(dbs, plan.inserts, one)


def measure_context(dbs: list[Db], limit_s: float) -> None:
    for db in dbs:
        with timeout(db.conn, limit_s):
            t = time.perf_counter()
            try:
                db.conn.execute(CONTEXT_SQL).fetchall()
            except psycopg.errors.QueryCanceled:
                db.fig.context_timeout_s = limit_s
                continue
            db.fig.context_s = time.perf_counter() - t


def measure(dsns: dict[str, str], plan: Plan, args: argparse.Namespace) -> dict[str, Figures]:
    """Every figure on every database (label -> DSN), the databases sampled in alternating blocks."""
    with contextlib.ExitStack() as stack:
        dbs = []
        for label, dsn in dsns.items():
            conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
            dbs.append(Db(conn, [r[0] for r in conn.execute(ORACLE_SQL)], Figures(label)))
        progress("all positions in order")
        measure_listing(dbs, plan, args.timeout)
        progress("one job's position")
        measure_positions(dbs, plan)
        progress("?order=queue_position&limit=50")
        measure_context(dbs, args.context_timeout)
        progress("INSERT ... RETURNING queue_position")
        measure_inserts(dbs, plan)
        return {db.fig.label: db.fig for db in dbs}


def pinned_figures(conn: Conn, limit_s: float) -> dict[str, str]:
    """Medians of 30 lookups at the head and in the middle of the queue and of 30 INSERTs, and one listing."""
    oracle = [r[0] for r in conn.execute(ORACLE_SQL)]
    out: dict[str, str] = {}
    for name, ids in (("position at the head", oracle[:30]),
                      ("position in the middle", oracle[len(oracle) // 2:len(oracle) // 2 + 30])):
        times = []
        for job_id in ids:
            t = time.perf_counter()
            conn.execute(POSITION_SQL, (job_id,)).fetchone()
            times.append(time.perf_counter() - t)
        out[name] = f"{ms(times, 50):.2f} ms"
    times = []
    for i in range(30):
        payload = psycopg.types.json.Jsonb({"topic": f"pinned {i}"})
        t = time.perf_counter()
        conn.execute(INSERT_SQL, ("topic_short", "medium", payload)).fetchone()
        times.append(time.perf_counter() - t)
    out["INSERT RETURNING"] = f"{ms(times, 50):.2f} ms"
    with timeout(conn, limit_s):
        t = time.perf_counter()
        try:
            conn.execute(LIST_SQL).fetchall()
            out["all positions in order"] = f"{time.perf_counter() - t:.3f} s"
        except psycopg.errors.QueryCanceled:
            out["all positions in order"] = f"did not finish in {limit_s:g} s"
    return out


def measure_pinned(dsn: str, claims: int, limit_s: float) -> tuple[dict[str, str], dict[str, str]]:
    """The figures, then again after ``claims`` jobs were claimed and completed while a REPEATABLE READ
    transaction pinned the horizon: each left an index entry at the head of the queue that no scan
    may remove, and the pages it touched are no longer all-visible."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 100000, max_manim_renders = 100000")
        quiet = pinned_figures(conn, limit_s)
        with psycopg.connect(dsn) as pin:
            pin.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            pin.execute("SELECT count(*) FROM reactor.jobs WHERE status = 'queued'")
            done = 0
            while done < claims:
                rows = conn.execute("SELECT id, attempt FROM reactor.claim_jobs('bench', %s, interval '60 s')",
                                    (min(500, claims - done),)).fetchall()
                if not rows:
                    break
                batch = [{"id": str(r[0]), "attempt": r[1], "status": "completed", "result": {"video_url": "x"},
                          "retry_count": 0, "delay_s": 0, "error_category": None, "error_message": None,
                          "error_details": None} for r in rows]
                conn.execute("SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'bench', 0, interval '60 s')",
                             (psycopg.types.json.Jsonb(batch),))
                done += len(rows)
            pinned = pinned_figures(conn, limit_s)
            pin.rollback()
    return quiet, pinned


def report_pinned(claims: int, figures: dict[str, tuple[dict[str, str], dict[str, str]]]) -> None:
    print(f"\nwith the horizon pinned (a REPEATABLE READ transaction) while {claims:,} jobs were claimed and "
          f"completed from the head (no bound; medians of 30):")
    cols = [(side, when) for side in figures for when in ("quiet", "pinned")]
    width = 24
    print(f"{'':<36}" + "".join(f"{side + ' ' + when:>{width}}" for side, when in cols))
    names = list(next(iter(figures.values()))[0])
    for name in names:
        print(f"{name:<36}" + "".join(
            f"{figures[side][0 if when == 'quiet' else 1][name]:>{width}}" for side, when in cols))


# -- report -----------------------------------------------------------------------------------------


def change(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.0f}%"


def report(before: tuple[Figures, Figures], after: tuple[Figures, Figures], plan: Plan) -> bool:
    cols = [*before, *after]
    width = 26
    print(f"\n{'':<36}" + "".join(f"{c.label:>{width}}" for c in cols))
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("all positions in order (jobs)", Figures.listing),
        ("one job's position p50 / p99 ms",
         lambda c: f"{ms(c.position_ms, 50):.2f} / {ms(c.position_ms, 99):.2f}"
                   + ("" if c.positions_right else " WRONG")),
        ("INSERT RETURNING p50 / p99 ms", lambda c: f"{ms(c.insert_ms, 50):.2f} / {ms(c.insert_ms, 99):.2f}"),
        ("  RETURNING position right", lambda c: f"{c.returning_checked - c.returning_wrong}/{c.returning_checked}"),
        ("?order=queue_position&limit=50", Figures.context),
    ]
    for name, cell in rows:
        print(f"{name:<36}" + "".join(f"{cell(c):>{width}}" for c in cols))

    q, f = after
    checks: list[tuple[str, bool, str]] = []
    worst_list = max(min(q.list_s, default=float("inf")), min(f.list_s, default=float("inf")))
    checks.append((f"all positions in order <= {GOAL_LIST_S:g} s", worst_list <= GOAL_LIST_S
                   and q.list_right and f.list_right, f"{worst_list:.3f} s"))
    worst_pos = max(ms(q.position_ms, 99), ms(f.position_ms, 99))
    checks.append((f"one job's position p99 <= {GOAL_POSITION_MS:g} ms", worst_pos <= GOAL_POSITION_MS
                   and q.positions_right and f.positions_right, f"{worst_pos:.2f} ms"))
    worst_ins = max(ms(q.insert_ms, 50), ms(f.insert_ms, 50))
    wrong = q.returning_wrong + f.returning_wrong
    checks.append((f"INSERT p50 <= {GOAL_INSERT_P50_MS:g} ms, RETURNING queue_position right",
                   worst_ins <= GOAL_INSERT_P50_MS and wrong == 0,
                   f"{worst_ins:.2f} ms, {wrong} wrong of {q.returning_checked + f.returning_checked}"))
    moves = [("listing", min(q.list_s, default=float("nan")), min(f.list_s, default=float("nan"))),
             ("position p50", ms(q.position_ms, 50), ms(f.position_ms, 50)),
             ("INSERT p50", ms(q.insert_ms, 50), ms(f.insert_ms, 50))]
    checks.append((f"{plan.finished:,} finished jobs move none by more than {GOAL_MOVE:.0%}",
                   all(abs(b - a) <= GOAL_MOVE * a for _, a, b in moves),
                   ", ".join(f"{name} {change(a, b)}" for name, a, b in moves)))
    print()
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    ok = all(c[1] for c in checks)
    print("VERDICT:", "PASS" if ok else "FAIL")
    return ok


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 queued, 100,000 finished, fewer samples")
    ap.add_argument("--fast", action="store_true", help="cluster with fsync off (the tests' settings)")
    ap.add_argument("--before", default="bd72430", help="git revision whose migrations are 'before' (bd72430)")
    ap.add_argument("--timeout", type=float, default=60.0, help="statement_timeout of the listing, s (60)")
    ap.add_argument("--context-timeout", type=float, default=10.0,
                    help="statement_timeout of ?order=queue_position&limit=50, s (10)")
    ap.add_argument("--queued", type=int, help="queued jobs (100,000; 10,000 with --quick)")
    ap.add_argument("--finished", type=int, help="finished jobs added (1,000,000; 100,000 with --quick)")
    ap.add_argument("--pinned", type=int, default=0, metavar="N",
                    help="then, in each side's queued-only database, N claims under a pinned horizon (no bound)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    base = QUICK if args.quick else FULL
    plan = Plan(queued=args.queued or base.queued, finished=args.finished or base.finished, ids=base.ids,
                inserts=base.inserts, warmup=base.warmup, list_rounds=base.list_rounds)
    settings = dict(FAST_SETTINGS) if args.fast else {"max_connections": "50", "shared_buffers": "128MB"}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip() or "?"
    with tempfile.TemporaryDirectory(prefix="reactor-positions-") as tmp:
        before_migrations = migrations_at(args.before, Path(tmp) / "before")
        after_migrations = discover()
        server = EmbeddedPostgres(settings=settings)
        dsn = server.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as admin:
                version = admin.execute("SHOW server_version").fetchone()
                for side, migrations in (("before", before_migrations), ("after", after_migrations)):
                    t = time.monotonic()
                    create_db(admin, f"{side}_q")
                    migrate_up(server.dsn_for(f"{side}_q"), migrations)
                    load_queued(server.dsn_for(f"{side}_q"), plan.queued)
                    create_db(admin, f"{side}_f", template=f"{side}_q")
                    load_finished(server.dsn_for(f"{side}_f"), plan.finished)
                    progress(f"{side}: {len(migrations)} migrations, {plan.queued:,} queued, "
                             f"+{plan.finished:,} finished in a copy ({time.monotonic() - t:.0f} s)")
            print(f"positions_bench: {plan.queued:,} queued (20% high, 50% medium, 30% low; a third Manim), "
                  f"then {plan.finished:,} finished added; PostgreSQL {version[0] if version else '?'}, "
                  f"{'fsync off (--fast)' if args.fast else 'durable'}; before = {args.before} "
                  f"({len(before_migrations)} migrations), after = this tree at {head} "
                  f"({len(after_migrations)} migrations)")
            print(f"one job's position over {plan.ids} ids spread through the queue; {plan.inserts} INSERTs "
                  f"per database; listing best of {plan.list_rounds}, statement_timeout {args.timeout:g} s")
            labels = {"before_q": "before", "before_f": f"before +{plan.finished:,}",
                      "after_q": "after", "after_f": f"after +{plan.finished:,}"}
            figures = measure({label: server.dsn_for(name) for name, label in labels.items()}, plan, args)
            before = (figures[labels["before_q"]], figures[labels["before_f"]])
            after = (figures[labels["after_q"]], figures[labels["after_f"]])
            pinned: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
            for side in ("before", "after") if args.pinned else ():
                progress(f"{side}: {args.pinned:,} claims under a pinned horizon")
                pinned[side] = measure_pinned(server.dsn_for(f"{side}_q"), args.pinned, args.context_timeout)
        finally:
            server.destroy()
    ok = report(before, after, plan)
    if pinned:
        report_pinned(args.pinned, pinned)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
