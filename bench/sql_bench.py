#!/usr/bin/env python3
"""Benchmark of the SQL contract: enqueue, bulk enqueue, dequeue and completion, shallow and deep.

Usage::

    python3 bench/sql_bench.py [--quick] [--durable | --fast] [--dsn DSN]

Without ``--dsn`` it starts a private PostgreSQL (``reactor.db.embedded.EmbeddedPostgres``) with
PostgreSQL's default durability (fsync and synchronous_commit on, as in production), or with
``FAST_SETTINGS`` (fsync off) under ``--fast``. With ``--dsn`` it works on that server instead.
Either way it creates two fresh, migrated scratch databases and drops them at the end: one keeps
its queue (almost) empty, the other holds ``depth`` queued jobs (100,000; 10,000 with
``--quick``). Every figure is measured on both, in alternating blocks of samples, so that load from
other processes on a shared machine falls on both sides of a deep/empty ratio alike.

Figures: single-row INSERT latency through the ``jobs`` view, with and without
``RETURNING queue_position``; a 10,000-row ``INSERT ... SELECT`` in rows/s and the notifications it
sends; the reactor's dequeue and completion UPDATEs of the job at the head. Not goals, shown for
context: the head lookup itself, and ``reactor.claim_jobs`` when the schema has it. A summary
checks each goal; the exit status is 1 when one fails.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import conninfo, sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

REPO_ROOT = Path(__file__).resolve().parent.parent

Conn = psycopg.Connection[TupleRow]

# -- statements under test ------------------------------------------------------------------------

INSERT_SQL = "INSERT INTO jobs (job_type, priority, payload) VALUES (%s, %s, %s)"
INSERT_POS_SQL = INSERT_SQL + " RETURNING queue_position"
BULK_SQL = """
INSERT INTO jobs (job_type, priority, payload)
SELECT (ARRAY['doubt', 'topic_short', 'daily_ca'])[1 + g %% 3],
       (ARRAY['high', 'medium', 'low'])[1 + (g / 3) %% 3],
       jsonb_build_object('topic', 'bench job ' || g)
FROM generate_series(1, %s::int) AS g
"""
HEAD_SQL = (
    "SELECT id FROM reactor.jobs WHERE status = 'queued' "
    "ORDER BY priority_rank, created_at, job_no LIMIT %s"
)
DEQUEUE_SQL = (
    "UPDATE reactor.jobs SET status = 'processing', locked_by = 'bench', "
    "lease_expires_at = now() + interval '30 s', attempt = attempt + 1 WHERE id = %s"
)
COMPLETE_SQL = (
    "UPDATE reactor.jobs SET status = 'completed', result = '{\"video_url\": \"x\"}' "
    "WHERE id = %s AND locked_by = 'bench'"
)

# Timed only when the schema has it (it may not yet).
CLAIM_SIGNATURE = "reactor.claim_jobs(text, integer, interval, timestamptz)"
CLAIM_SQL = "SELECT id FROM reactor.claim_jobs('bench', 1, interval '30 s')"

JOB_TYPES = (("doubt", "question"), ("topic_short", "topic"), ("daily_ca", "date"))
PRIORITIES = ("high", "medium", "low")

# -- goals ----------------------------------------------------------------------------------------

GOAL_INSERT_P50_MS = 10.0
GOAL_BULK_RATIO = 0.5
GOAL_DEPTH_RATIO = 1.5

#: samples taken on one side before switching to the other
BLOCK = 25


# -- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``pct`` % of values <= it."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def p50(values: Sequence[float]) -> float:
    return percentile(values, 50)


def p99(values: Sequence[float]) -> float:
    return percentile(values, 99)


@dataclass
class Latency:
    """Timed samples of one statement (seconds), with the queue depth before and after."""

    label: str
    depth_before: int
    depth_after: int
    samples: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return p50(self.samples) * 1000

    @property
    def p99_ms(self) -> float:
        return p99(self.samples) * 1000

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples) * 1000


@dataclass
class Bulk:
    """Repeated bulk INSERTs at one depth."""

    depth: int
    rows: int
    seconds: list[float] = field(default_factory=list)
    notifications: list[int] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_rows_per_s(self) -> float:
        return self.rows / self.median_s

    @property
    def per_row_ms(self) -> float:
        return self.median_s * 1000 / self.rows


@dataclass(frozen=True)
class Plan:
    depth: int
    samples: int
    warmup: int
    bulk_rows: int
    bulk_repeats: int
    dequeue_samples: int
    dequeue_warmup: int
    head_samples: int


FULL = Plan(depth=100_000, samples=2_000, warmup=200, bulk_rows=10_000, bulk_repeats=3,
            dequeue_samples=1_000, dequeue_warmup=50, head_samples=30)
QUICK = Plan(depth=10_000, samples=300, warmup=30, bulk_rows=10_000, bulk_repeats=3,
             dequeue_samples=300, dequeue_warmup=20, head_samples=20)


@dataclass
class DepthResult:
    depth: int
    insert: Latency
    insert_pos: Latency
    bulk: Bulk
    head: Latency
    dequeue: Latency
    complete: Latency
    claim: Latency | None


# -- helpers --------------------------------------------------------------------------------------


class JobMaker:
    """Deterministic mix of job types and priorities."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._n = 0

    def __call__(self) -> tuple[str, str, Jsonb]:
        self._n += 1
        job_type, field_name = self._rng.choice(JOB_TYPES)
        priority = self._rng.choice(PRIORITIES)
        return job_type, priority, Jsonb({field_name: f"bench job {self._n}"})


@dataclass
class Side:
    """One database of the comparison: its connections and the jobs it keeps queued."""

    conn: Conn
    listener: Conn
    deep: bool
    make: JobMaker
    baseline: int = 0  # job_no of the last job that belongs to the standing queue


def scalar(conn: Conn, query: str, params: Sequence[object] = ()) -> object:
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {query!r}")
    return row[0]


def int_scalar(conn: Conn, query: str, params: Sequence[object] = ()) -> int:
    value = scalar(conn, query, params)
    if not isinstance(value, int):
        raise RuntimeError(f"expected an integer from {query!r}, got {value!r}")
    return value


def queued(conn: Conn) -> int:
    return int_scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE status = 'queued'")


def max_job_no(conn: Conn) -> int:
    return int_scalar(conn, "SELECT coalesce(max(job_no), 0) FROM reactor.jobs")


def vacuum(conn: Conn) -> None:
    conn.execute("VACUUM ANALYZE reactor.jobs")


def reset(side: Side) -> None:
    """Remove the jobs a section added, so that the next section starts at the same depth."""
    side.conn.execute("DELETE FROM reactor.jobs WHERE job_no > %s", (side.baseline,))
    vacuum(side.conn)


def check_one(what: str, rowcount: int) -> None:
    if rowcount != 1:
        raise RuntimeError(f"{what} touched {rowcount} rows, expected 1")


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def interleave(sides: Sequence[Side], n: int, step: Callable[[int, int], None]) -> None:
    """Call ``step(side_index, i)`` for i in range(n) on every side, in alternating blocks."""
    for block, start in enumerate(range(0, n, BLOCK)):
        order = range(len(sides)) if block % 2 == 0 else reversed(range(len(sides)))
        for k in order:
            for i in range(start, min(n, start + BLOCK)):
                step(k, i)


# -- sections -------------------------------------------------------------------------------------


def time_inserts(sides: Sequence[Side], label: str, query: str, plan: Plan) -> list[Latency]:
    returning = "RETURNING" in query
    for side in sides:
        for _ in range(plan.warmup):
            cur = side.conn.execute(query, side.make())
            if returning:
                cur.fetchone()
    results = [Latency(label, queued(side.conn), 0) for side in sides]
    clock = time.perf_counter

    def step(k: int, _: int) -> None:
        side = sides[k]
        params = side.make()
        t0 = clock()
        cur = side.conn.execute(query, params)
        if returning and cur.fetchone() is None:
            raise RuntimeError("INSERT ... RETURNING returned no row")
        results[k].samples.append(clock() - t0)

    interleave(sides, plan.samples, step)
    for side, result in zip(sides, results, strict=True):
        result.depth_after = queued(side.conn)
        reset(side)
    return results


def drain(listener: Conn, timeout: float) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=timeout)]


def bulk_once(side: Side, plan: Plan, result: Bulk) -> None:
    """One bulk INSERT, counted by a listener. It listens only here: a listener that does not read
    its notifications would slow every other section down."""
    side.listener.execute("LISTEN reactor_events")
    try:
        drain(side.listener, 0.1)
        t0 = time.perf_counter()
        cur = side.conn.execute(BULK_SQL, (plan.bulk_rows,))
        elapsed = time.perf_counter() - t0
        if cur.rowcount != plan.bulk_rows:
            raise RuntimeError(f"bulk INSERT wrote {cur.rowcount} rows, expected {plan.bulk_rows}")
        received = drain(side.listener, 1.0)
    finally:
        side.listener.execute("UNLISTEN *")
    result.seconds.append(elapsed)
    result.notifications.append(len(received))
    result.payloads.extend(received)
    reset(side)


def time_bulk(sides: Sequence[Side], plan: Plan) -> list[Bulk]:
    results = [Bulk(queued(side.conn), plan.bulk_rows) for side in sides]
    for rep in range(plan.bulk_repeats):
        order = range(len(sides)) if rep % 2 == 0 else reversed(range(len(sides)))
        for k in order:
            bulk_once(sides[k], plan, results[k])
    return results


def time_head_lookup(sides: Sequence[Side], plan: Plan) -> list[Latency]:
    """The head lookup on its own (not a goal: the reactor claims with its own statement)."""
    results = [Latency("head lookup (HEAD_SQL LIMIT 1)", queued(s.conn), 0) for s in sides]

    def step(k: int, _: int) -> None:
        t0 = time.perf_counter()
        row = sides[k].conn.execute(HEAD_SQL, (1,)).fetchone()
        results[k].samples.append(time.perf_counter() - t0)
        if row is None:
            raise RuntimeError("no queued job at the head")

    interleave(sides, plan.head_samples, step)
    for result in results:
        result.depth_after = result.depth_before
    return results


def time_dequeue(sides: Sequence[Side], plan: Plan) -> tuple[list[Latency], list[Latency]]:
    """Take the job at the head of the queue and complete it, round after round, at a steady depth.

    Each round takes the head, completes it, then enqueues a replacement (untimed), so the depth
    stays where it was: 1 (shallow) or ``depth`` (deep). Shallow: the head is found with HEAD_SQL
    at the start of each round. Deep: the ids of the next heads are found beforehand by one
    HEAD_SQL (LIMIT rounds; the replacements queue up behind them): at depth the lookup is a
    sequential scan, and running it between rounds evicts the CPU caches and roughly doubles the
    UPDATE times measured right after it, which is the lookup's cost, not theirs.
    """
    rounds = plan.dequeue_warmup + plan.dequeue_samples
    heads: list[list[object]] = []
    for side in sides:
        found = [row[0] for row in side.conn.execute(HEAD_SQL, (rounds,))] if side.deep else []
        if side.deep and len(found) != rounds:
            raise RuntimeError(f"found {len(found)} queued jobs, need {rounds}")
        heads.append(found)
    takes = [Latency("dequeue UPDATE", queued(s.conn), 0) for s in sides]
    dones = [Latency("completion UPDATE", t.depth_before, 0) for t in takes]
    clock = time.perf_counter

    def step(k: int, i: int) -> None:
        side = sides[k]
        if side.deep:
            job_id = heads[k][i]
        else:
            row = side.conn.execute(HEAD_SQL, (1,)).fetchone()
            if row is None:
                raise RuntimeError("no queued job at the head")
            job_id = row[0]
        t0 = clock()
        n_taken = side.conn.execute(DEQUEUE_SQL, (job_id,)).rowcount
        t1 = clock()
        n_done = side.conn.execute(COMPLETE_SQL, (job_id,)).rowcount
        t2 = clock()
        check_one("dequeue UPDATE", n_taken)
        check_one("completion UPDATE", n_done)
        side.conn.execute(INSERT_SQL, side.make())
        if i >= plan.dequeue_warmup:
            takes[k].samples.append(t1 - t0)
            dones[k].samples.append(t2 - t1)

    for k in range(len(sides)):
        for i in range(plan.dequeue_warmup):
            step(k, i)
    interleave(sides, plan.dequeue_samples, lambda k, i: step(k, plan.dequeue_warmup + i))
    for side, take, done in zip(sides, takes, dones, strict=True):
        take.depth_after = done.depth_after = queued(side.conn)
    return takes, dones


def has_claim_jobs(conn: Conn) -> bool:
    return scalar(conn, "SELECT to_regprocedure(%s) IS NOT NULL", (CLAIM_SIGNATURE,)) is True


def time_claim(sides: Sequence[Side], plan: Plan) -> list[Latency] | None:
    """reactor.claim_jobs(..., 1, ...), when the schema has it (not a goal).

    Same rounds as time_dequeue: claim, complete (untimed), enqueue a replacement (untimed).
    """
    if not all(has_claim_jobs(side.conn) for side in sides):
        return None
    results = [Latency("reactor.claim_jobs(p_max => 1)", queued(s.conn), 0) for s in sides]

    def step(k: int, i: int) -> None:
        side = sides[k]
        t0 = time.perf_counter()
        rows = side.conn.execute(CLAIM_SQL).fetchall()
        elapsed = time.perf_counter() - t0
        check_one("claim_jobs", len(rows))
        check_one("completion UPDATE", side.conn.execute(COMPLETE_SQL, (rows[0][0],)).rowcount)
        side.conn.execute(INSERT_SQL, side.make())
        if i >= plan.dequeue_warmup:
            results[k].samples.append(elapsed)

    try:
        for k in range(len(sides)):
            for i in range(plan.dequeue_warmup):
                step(k, i)
        interleave(sides, plan.dequeue_samples, lambda k, i: step(k, plan.dequeue_warmup + i))
    except (psycopg.Error, RuntimeError) as exc:
        print(f"  note: timing reactor.claim_jobs failed, left out: {exc}", flush=True)
        return None
    for side, result in zip(sides, results, strict=True):
        result.depth_after = queued(side.conn)
    return results


def measure(sides: Sequence[Side], plan: Plan) -> list[DepthResult]:
    """Every figure on every side; each INSERT section leaves the queue as it found it."""
    for side in sides:
        side.baseline = max_job_no(side.conn)
    progress("single-row INSERT")
    ins = time_inserts(sides, "single-row INSERT", INSERT_SQL, plan)
    progress("single-row INSERT ... RETURNING queue_position")
    ins_pos = time_inserts(sides, "INSERT ... RETURNING queue_position", INSERT_POS_SQL, plan)
    progress(f"{plan.bulk_rows:,}-row INSERT x {plan.bulk_repeats}")
    bulks = time_bulk(sides, plan)
    progress("head lookup, dequeue and completion")
    for side in sides:
        if not side.deep:
            side.conn.execute(INSERT_SQL, side.make())  # the one queued job of the shallow side
    heads = time_head_lookup(sides, plan)
    takes, dones = time_dequeue(sides, plan)
    progress("reactor.claim_jobs, if the schema has it")
    claims = time_claim(sides, plan)
    return [
        DepthResult(bulks[k].depth, ins[k], ins_pos[k], bulks[k], heads[k], takes[k], dones[k],
                    claims[k] if claims else None)
        for k in range(len(sides))
    ]


# -- database setup -------------------------------------------------------------------------------


@contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """Yield (admin DSN, description of where the server came from)."""
    if args.dsn:
        yield args.dsn, "given by --dsn"
        return
    sys.path.insert(0, str(REPO_ROOT))
    from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres

    settings = dict(FAST_SETTINGS) if args.fast else {}
    pg = EmbeddedPostgres(settings=settings)
    try:
        progress("starting a private PostgreSQL cluster (initdb)")
        dsn = pg.start()
        yield dsn, f"private cluster in {pg.base_dir}"
    finally:
        pg.destroy()


@contextmanager
def fresh_database(admin_dsn: str, suffix: str) -> Iterator[str]:
    """Create a scratch database, migrate it, yield its DSN, drop it."""
    sys.path.insert(0, str(REPO_ROOT))
    from reactor.db.migrations import migrate_up

    name = f"reactor_bench_{os.getpid()}_{suffix}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = conninfo.make_conninfo(admin_dsn, dbname=name)
        migrate_up(dsn)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# -- report ---------------------------------------------------------------------------------------


def depth_range(lat: Latency) -> str:
    if lat.depth_before == lat.depth_after:
        return f"{lat.depth_before:,}"
    return f"{lat.depth_before:,}->{lat.depth_after:,}"


def print_latencies(title: str, rows: list[Latency]) -> None:
    print(f"\n{title}")
    print(f"  {'statement':<38} {'queued':>16} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for lat in rows:
        print(
            f"  {lat.label:<38} {depth_range(lat):>16} {len(lat.samples):>6} "
            f"{lat.p50_ms:>8.2f} {lat.p99_ms:>8.2f} {lat.mean_ms:>8.2f}"
        )


def print_ratios(pairs: list[tuple[str, Latency, Latency]]) -> None:
    print(f"  {'ratio deep/shallow':<38} {'':>16} {'':>6} {'p50':>8} {'p99':>8}")
    for label, a, b in pairs:
        print(f"  {label:<38} {'':>16} {'':>6} {ratio(b.p50_ms, a.p50_ms):>8.2f} "
              f"{ratio(b.p99_ms, a.p99_ms):>8.2f}")


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def report(shallow: DepthResult, deep: DepthResult, plan: Plan) -> list[tuple[bool, str]]:
    print_latencies(
        "1. Single-row INSERT through the jobs view (autocommit, one client, mixed priorities)",
        [shallow.insert, deep.insert, shallow.insert_pos, deep.insert_pos],
    )
    print_ratios([("single-row INSERT", shallow.insert, deep.insert),
                  ("INSERT ... RETURNING queue_position", shallow.insert_pos, deep.insert_pos)])

    print(f"\n2. {plan.bulk_rows:,}-row INSERT ... SELECT generate_series "
          f"(x{plan.bulk_repeats}, median; rows removed after each run)")
    print(f"  {'queued before':>15} {'runs (s)':<26} {'median s':>9} {'rows/s':>10} "
          f"{'NOTIFYs':>8}")
    for bulk in (shallow.bulk, deep.bulk):
        runs = ", ".join(f"{s:.3f}" for s in bulk.seconds)
        print(f"  {bulk.depth:>15,} {runs:<26} {bulk.median_s:>9.3f} "
              f"{bulk.median_rows_per_s:>10,.0f} {'/'.join(map(str, bulk.notifications)):>8}")
    sample = next((p for p in deep.bulk.payloads if '"n"' in p), None)
    if sample:
        print(f"  NOTIFY payload of a bulk INSERT: {sample}")
    print("  notify cost: one commit and one NOTIFY per transaction, so a row of a bulk INSERT does "
          "not pay a single-row INSERT's:")
    for res in (shallow, deep):
        r = ratio(res.insert.mean_ms, res.bulk.per_row_ms)
        singles_s = res.insert.mean_ms * res.bulk.rows / 1000
        print(f"    queued {res.depth:>7,}: {res.bulk.per_row_ms:.4f} ms/row in bulk vs "
              f"{res.insert.mean_ms:.3f} ms per single-row INSERT (mean) = {r:,.1f}x; "
              f"{res.bulk.rows:,} single-row INSERTs ~ {singles_s:.1f} s vs {res.bulk.median_s:.2f} s")

    print_latencies(
        "3. Dequeue and completion of the job at the head of the queue (autocommit, by id)",
        [shallow.dequeue, deep.dequeue, shallow.complete, deep.complete],
    )
    print_ratios([("dequeue UPDATE", shallow.dequeue, deep.dequeue),
                  ("completion UPDATE", shallow.complete, deep.complete)])
    extra = [shallow.head, deep.head]
    if shallow.claim and deep.claim:
        extra += [shallow.claim, deep.claim]
    print_latencies("   Not goals: finding the head (HEAD_SQL) and, if the schema has it, claim_jobs",
                    extra)
    pairs = [("head lookup", shallow.head, deep.head)]
    if shallow.claim and deep.claim:
        pairs.append(("reactor.claim_jobs", shallow.claim, deep.claim))
    print_ratios(pairs)
    if not (shallow.claim and deep.claim):
        print("  (reactor.claim_jobs not in the schema: not timed)")

    d = f"{deep.depth:,}"
    bulk_r = ratio(deep.bulk.median_rows_per_s, shallow.bulk.median_rows_per_s)
    deq_r = ratio(deep.dequeue.p50_ms, shallow.dequeue.p50_ms)
    com_r = ratio(deep.complete.p50_ms, shallow.complete.p50_ms)
    notes = shallow.bulk.notifications + deep.bulk.notifications
    return [
        (deep.insert.p50_ms <= GOAL_INSERT_P50_MS,
         f"single-row INSERT p50 at {d} queued <= {GOAL_INSERT_P50_MS:g} ms: "
         f"{deep.insert.p50_ms:.2f} ms"),
        (bulk_r >= GOAL_BULK_RATIO,
         f"{plan.bulk_rows:,}-row INSERT at {d} queued >= {GOAL_BULK_RATIO:g} x empty: "
         f"{deep.bulk.median_rows_per_s:,.0f} vs {shallow.bulk.median_rows_per_s:,.0f} rows/s "
         f"({bulk_r:.2f})"),
        (all(n == 1 for n in notes),
         f"one NOTIFY per {plan.bulk_rows:,}-row INSERT: received {notes}"),
        (deq_r <= GOAL_DEPTH_RATIO,
         f"dequeue p50 {d}/empty <= {GOAL_DEPTH_RATIO:g}: {deep.dequeue.p50_ms:.2f} / "
         f"{shallow.dequeue.p50_ms:.2f} ms = {deq_r:.2f}"),
        (com_r <= GOAL_DEPTH_RATIO,
         f"completion p50 {d}/empty <= {GOAL_DEPTH_RATIO:g}: {deep.complete.p50_ms:.2f} / "
         f"{shallow.complete.p50_ms:.2f} ms = {com_r:.2f}"),
    ]


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller run (~1 min): {QUICK.depth:,} deep, {QUICK.samples} samples")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--durable", action="store_true",
                      help="PostgreSQL's default durability, fsync on (the default)")
    mode.add_argument("--fast", action="store_true",
                      help="the embedded cluster's FAST_SETTINGS (fsync off; not crash-safe)")
    parser.add_argument("--dsn", help="use this server instead of starting a private one (two "
                                      "scratch databases are created and dropped: needs CREATEDB)")
    args = parser.parse_args(argv)
    if args.dsn and args.fast:
        parser.error("--fast applies to the private cluster only; with --dsn the server's own "
                     "settings are used (and printed)")
    return args


def print_header(conn: Conn, where: str, args: argparse.Namespace, plan: Plan) -> None:
    def show(name: str) -> object:
        return scalar(conn, f"SHOW {name}")

    if args.dsn:
        mode = "as configured on the given server"
    elif args.fast:
        mode = "--fast: embedded FAST_SETTINGS (fsync off, not crash-safe)"
    else:
        mode = "default: PostgreSQL defaults, as in production"
    print("reactor SQL benchmark" + (" (--quick)" if args.quick else ""))
    print(f"  server      PostgreSQL {show('server_version')}, {where}")
    print(f"  durability  {mode}: fsync={show('fsync')}, "
          f"synchronous_commit={show('synchronous_commit')}, "
          f"full_page_writes={show('full_page_writes')}, shared_buffers={show('shared_buffers')}")
    print(f"  machine     {os.cpu_count()} CPUs, {platform.platform()}, Python "
          f"{platform.python_version()}, psycopg {psycopg.__version__}")
    print(f"  plan        shallow: an empty queue; deep: {plan.depth:,} queued jobs; each in its own "
          f"database, sampled in alternating blocks of {BLOCK}")
    print(f"              {plan.samples:,} samples per INSERT figure after {plan.warmup} warm-up; "
          f"{plan.dequeue_samples:,} dequeue/complete rounds after {plan.dequeue_warmup}; "
          f"bulk {plan.bulk_rows:,} rows x {plan.bulk_repeats}")
    sys.stdout.flush()


def run(dsns: tuple[str, str], where: str, args: argparse.Namespace,
        plan: Plan) -> list[tuple[bool, str]]:
    with ExitStack() as stack:
        sides = [
            Side(
                conn=stack.enter_context(psycopg.connect(dsn, autocommit=True)),
                listener=stack.enter_context(psycopg.connect(dsn, autocommit=True)),
                deep=deep,
                make=JobMaker(seed=1 + deep),
            )
            for dsn, deep in zip(dsns, (False, True), strict=True)
        ]
        shallow, deep = sides
        print_header(deep.conn, where, args, plan)
        progress(f"filling the deep queue with {plan.depth:,} jobs")
        t0 = time.perf_counter()
        deep.conn.execute(BULK_SQL, (plan.depth,))
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vacuum(deep.conn)
        vacuum(shallow.conn)
        vac_s = time.perf_counter() - t0
        print(f"  fill        {plan.depth:,} jobs with one INSERT ... SELECT in {fill_s:.1f} s "
              f"({plan.depth / fill_s:,.0f} rows/s), then VACUUM ANALYZE reactor.jobs "
              f"({vac_s:.1f} s) before measuring;")
        print("              after each INSERT section its rows are deleted and reactor.jobs "
              "vacuumed again")
        results = measure(sides, plan)
        goals = report(results[0], results[1], plan)
    return goals


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    with server(args) as (admin_dsn, where), \
            fresh_database(admin_dsn, "shallow") as shallow_dsn, \
            fresh_database(admin_dsn, "deep") as deep_dsn:
        goals = run((shallow_dsn, deep_dsn), where, args, plan)
    print(f"\nSummary (deep = {plan.depth:,} queued; {time.perf_counter() - started:.0f} s in all)")
    for ok, text in goals:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    return 0 if all(ok for ok, _ in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
