"""Soak: two reactors under a steady mixed load, with a fault injected every ~45 s.

    python3 bench/soak.py                  # 10 minutes
    python3 bench/soak.py --minutes 3      # shorter (fewer faults: one every --fault-every s)

Everything runs as real processes (tests/support/cluster.py): a private PostgreSQL (synchronous
commits; fsync off), the orchestrator double (``python -m reactor dev-orchestrator``), and two
``python -m reactor run --lease-seconds 3 --listen ...`` reactors, with an admin feed client that
stays connected (and resumes with ``?since=`` when its reactor goes away).

Load: --rate jobs/s (20), one INSERT each, mixed job types and priorities; about 12% carry a
double marker: ``[[status=500]]`` (retried, then failed), ``[[fail_first=1:status=503]]``
(released once, then completed), ``[[status=400]]`` (failed at once).

Faults, in this order, one every --fault-every s (45) plus up to 15 s of jitter, after 20 s:
listener_kill (pg_terminate_backend on the LISTEN backends), pg_fast (PostgreSQL restarted, fast),
sigkill (the reactor holding the most jobs, mid-render; started again once its jobs are rescued),
sigstop (a reactor stopped past its lease, continued 5 s later: a zombie), orch_down (the double
SIGKILLed, started again 10 s later on the same port), pg_immediate (PostgreSQL restarted,
immediate), orch_slow (3 s renders for 20 s), burst (--burst jobs in one INSERT, 0 ms renders),
orch_garbage (a quarter garbage and a quarter malformed answers for 20 s), notify_flood (--flood
NOTIFYs, one transaction each), vanishing_clients (--clients feed connections dropped without a
close).

Printed at the end: the invariants of tests/support/cluster.py (exit status 1 if one is broken),
each fault with its recovery time, and per minute: pickup latency (created_at -> the double's
received_at of the job's first render; steady-load jobs only), reactor RSS (from /proc), and the
errors by category. Recovery after a fault: from the fault until every job it hit is back in work
(final, or started again by a live reactor): for listener_kill the jobs inserted while the
listeners were away; for a restart the jobs in processing at the fault and those inserted while
PostgreSQL was down; for sigkill and sigstop the jobs the reactor held; for orch_down the jobs in
processing at the kill and those inserted while it was down (measured from its return). Goal: 45 s.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reactor.db.embedded import EmbeddedPostgres
from reactor.db.migrations import migrate_up
from tests.support.cluster import (
    CHAOS_PG_SETTINGS,
    FATES,
    INPUT_FIELD,
    Cluster,
    FeedWatcher,
    check_all,
    feed_clients,
    gather,
    held_by,
    insert_jobs,
    kill_listeners,
    listeners,
    mixed_job,
    not_restarted,
    notify_flood,
    summary,
    unfinished,
    vanishing_clients,
)
from tests.support.processes import rss_kib, until

FAULTS = ("listener_kill", "pg_fast", "sigkill", "sigstop", "orch_down", "pg_immediate", "orch_slow", "burst",
          "orch_garbage", "notify_flood", "vanishing_clients")
RECOVERY_GOAL_S = 45.0


@dataclass
class Fault:
    name: str
    at: float  # time.time() of the fault
    t: float  # seconds since the soak started
    hit: int = 0
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, pg: EmbeddedPostgres, dsn: str, workdir: Path) -> None:
        self.args = args
        self.pg = pg
        self.rng = random.Random(args.seed)
        self.cluster = Cluster(pg, dsn, workdir, lease_s=args.lease_seconds, latency_ms=args.latency_ms,
                               jitter_ms=args.jitter_ms, seed=args.seed)
        self.watcher = FeedWatcher(self.cluster.feed_urls, self.cluster.token)
        self.started = time.time()
        self.inserted: list[tuple[str, float]] = []  # (id, time.time() after the insert returned)
        self.steady: set[str] = set()
        self.fates: dict[str, frozenset[str]] = {}
        self.unconfirmed: list[str] = []  # input texts of inserts whose outcome is unknown
        self.refused = 0
        self.faults: list[Fault] = []
        self.rss: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.allowance = 0
        self.allowance_why: list[str] = []
        self.crashes: list[str] = []
        self.stop_load = anyio.Event()
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def now(self) -> float:
        return time.time() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.now():6.1f} s] {text}", flush=True)

    # -- load and sampling --------------------------------------------------------------------

    async def load(self) -> None:
        n = 0
        conn: psycopg.AsyncConnection[Any] | None = None
        next_at = time.monotonic()
        while not self.stop_load.is_set():
            n += 1
            job_type, priority, text, fate = mixed_job(self.rng, n)
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.cluster.dsn, autocommit=True, connect_timeout=5)
                cur = await conn.execute(
                    "INSERT INTO jobs (job_type, priority, payload) "
                    "VALUES (%s, %s, jsonb_build_object(%s::text, %s::text)) RETURNING id",
                    (job_type, priority, INPUT_FIELD[job_type], text))
                row = await cur.fetchone()
                assert row is not None
                job_id = str(row[0])
                self.inserted.append((job_id, time.time()))
                self.steady.add(job_id)
                self.fates[job_id] = FATES[fate][1]
            except psycopg.OperationalError:
                # refused (the server is down) or cut off mid-commit: maybe inserted, checked at the end
                self.unconfirmed.append(text)
                self.refused += 1
                if conn is not None:
                    await conn.close()
                conn = None
            next_at += 1 / self.args.rate
            delay = next_at - time.monotonic()
            if delay < -5:
                next_at = time.monotonic()  # fell far behind (the database was down): do not rush
            with anyio.move_on_after(max(0.0, delay)):
                await self.stop_load.wait()
        if conn is not None:
            await conn.close()

    async def watch_reactors(self) -> None:
        """A reactor that exits when nobody killed it is a finding: note it and start it again."""
        for rid, rp in list(self.cluster.reactors.items()):
            why = rp.crashed()
            if why is not None:
                self.crashes.append(f"t+{self.now():.0f} s reactor {rid} died: {why}")
                self.say(f"reactor {rid} DIED ({why}); starting it again")
                await self.cluster.restart_reactor(rid)

    async def sample_rss(self) -> None:
        while True:
            await self.watch_reactors()
            for rp in self.cluster.live_reactors() + [r for r in self.cluster.reactors.values() if r.stopped]:
                kib = rss_kib(rp.pid)
                if kib is not None:
                    self.rss[rp.reactor_id].append((self.now(), kib))
            await anyio.sleep(5)

    # -- faults -------------------------------------------------------------------------------

    def begin(self, name: str) -> Fault:
        fault = Fault(name, time.time(), self.now())
        self.faults.append(fault)
        self.say(f"fault: {name}")
        return fault

    async def recover(self, fault: Fault, ids: list[str], since: float, gone: tuple[str, ...] = (),
                      patience: float = 180.0) -> None:
        fault.hit = len(ids)
        with self.cluster.connect() as conn:
            try:
                await until(lambda: not_restarted(conn, ids, since, gone) == 0, "recovery", timeout=patience,
                            interval=0.2)
            except AssertionError:
                fault.notes.append(f"{not_restarted(conn, ids, since, gone)} jobs not back after {patience:g} s")
                return
        fault.recovery_s = time.time() - fault.at
        self.say(f"  {fault.name}: {len(ids)} jobs back in work after {fault.recovery_s:.1f} s")

    def inserted_between(self, start: float, end: float) -> list[str]:
        return [job_id for job_id, at in self.inserted if start <= at <= end]

    def processing(self) -> list[str]:
        with self.cluster.connect() as conn:
            return [str(r[0]) for r in conn.execute("SELECT id FROM reactor.jobs WHERE status = 'processing'")]

    async def listener_kill(self) -> None:
        f = self.begin("listener_kill")
        with self.cluster.connect() as conn:
            killed = kill_listeners(conn, self.cluster.dbname)
            await until(lambda: listeners(conn, self.cluster.dbname) >= len(self.cluster.live_reactors()),
                        "the listeners back")
        back = time.time()
        f.notes.append(f"{killed} listeners killed, all back after {back - f.at:.2f} s")
        await self.recover(f, self.inserted_between(f.at, back), f.at)

    async def pg_restart(self, mode: str) -> None:
        held = self.processing()
        f = self.begin(f"pg_{mode}")
        await anyio.to_thread.run_sync(self.pg.restart, mode)
        back = time.time()
        f.notes.append(f"down {back - f.at:.2f} s; {len(held)} jobs were in processing")
        await anyio.sleep(1.0)
        await self.recover(f, held + self.inserted_between(f.at, back + 1.0), f.at)

    def busiest(self) -> str:
        with self.cluster.connect() as conn:
            live = [rp.reactor_id for rp in self.cluster.live_reactors()]
            return max(live, key=lambda rid: len(held_by(conn, rid)))

    async def sigkill(self) -> None:
        victim = self.busiest()
        with self.cluster.connect() as conn:
            held = held_by(conn, victim)
        f = self.begin("sigkill")
        self.cluster.reactors[victim].kill()
        f.notes.append(f"{victim} killed holding {len(held)} jobs")
        await self.recover(f, held, f.at, (victim,))
        await self.cluster.restart_reactor(victim)

    async def sigstop(self) -> None:
        victim = self.busiest()
        rp = self.cluster.reactors[victim]
        with self.cluster.connect() as conn:
            held = held_by(conn, victim)
        f = self.begin("sigstop")
        rp.send(signal.SIGSTOP)
        self.allowance += len(held)
        self.allowance_why.append(f"{len(held)} renders of the stopped {victim}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.recover, f, held, f.at, (victim,))
            await anyio.sleep(self.args.lease_seconds + 5)
            rp.send(signal.SIGCONT)
        f.notes.append(f"{victim} stopped holding {len(held)} jobs, continued after {time.time() - f.at:.1f} s")

    async def orch_down(self) -> None:
        held = self.processing()
        f = self.begin("orch_down")
        await self.cluster.double.kill()
        await anyio.sleep(10)
        await self.cluster.double.start()
        back = time.time()
        f.notes.append(f"down {back - f.at:.1f} s; recovery counted from its return")
        await self.recover(f, held + self.inserted_between(f.at, back), back)
        if f.recovery_s is not None:
            f.recovery_s -= back - f.at

    async def orch_slow(self) -> None:
        f = self.begin("orch_slow")
        await self.cluster.double.control(latency_ms=3000, jitter_ms=0)
        await anyio.sleep(20)
        await self.cluster.double.control(latency_ms=self.args.latency_ms, jitter_ms=self.args.jitter_ms)
        f.notes.append("3 s renders for 20 s")

    async def orch_garbage(self) -> None:
        f = self.begin("orch_garbage")
        await self.cluster.double.control(mix={"ok": 2, "garbage": 1, "malformed": 1})
        await anyio.sleep(20)
        await self.cluster.double.control(mix={"ok": 1})
        f.notes.append("1/4 garbage, 1/4 malformed for 20 s")

    async def burst(self) -> None:
        f = self.begin("burst")
        with self.cluster.connect() as conn:
            ids = insert_jobs(conn, self.args.burst, text="[[latency=0]] burst")
        inserted = time.time()
        for job_id in ids:
            self.fates[job_id] = FATES["plain"][1]
        self.inserted += [(job_id, inserted) for job_id in ids]
        f.hit = len(ids)
        f.notes.append(f"{len(ids)} jobs inserted in {inserted - f.at:.2f} s")

        async def drained() -> None:
            with self.cluster.connect() as conn:
                await until(lambda: unfinished(conn, ids) == 0, "the burst drained", timeout=3600, interval=0.5)
            f.notes.append(f"all {len(ids)} done {time.time() - f.at:.1f} s after the insert")
            self.say(f"  burst drained after {time.time() - f.at:.1f} s")

        self.background.append(drained)

    async def notify_flood(self) -> None:
        f = self.begin("notify_flood")
        took = await anyio.to_thread.run_sync(notify_flood, self.cluster.dsn, self.args.flood)
        f.notes.append(f"{self.args.flood} NOTIFYs in {took:.1f} s ({self.args.flood / took:.0f}/s)")

    async def vanishing_clients(self) -> None:
        f = self.begin("vanishing_clients")
        got = await vanishing_clients(self.cluster.feed_urls(), self.args.clients, self.cluster.token)
        gone_at = time.time()
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                total = 0.0
                for rp in self.cluster.live_reactors():
                    total += feed_clients((await http.get(f"{rp.http_base}/metrics")).text)
                if total <= 1 or time.time() - gone_at > 120:
                    break
                await anyio.sleep(0.2)
        f.notes.append(f"{got} connected and dropped; counted clients back to {total:g} after "
                       f"{time.time() - gone_at:.1f} s")

    async def inject(self, name: str) -> None:
        if name == "pg_fast":
            await self.pg_restart("fast")
        elif name == "pg_immediate":
            await self.pg_restart("immediate")
        else:
            await getattr(self, name)()

    async def schedule(self, duration: float) -> None:
        order = [f for f in self.args.faults.split(",") if f]
        await anyio.sleep(min(20.0, duration / 4))
        i = 0
        while self.now() < duration - 15:
            next_at = self.now() + self.args.fault_every + self.rng.uniform(0, 15)
            async with anyio.create_task_group() as tg:
                await self.inject(order[i % len(order)])
                for job in self.background:
                    tg.start_soon(job)
                self.background.clear()
                i += 1
                await anyio.sleep(max(0.0, min(next_at, duration - 15) - self.now()))
                tg.cancel_scope.cancel()

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        duration = args.minutes * 60
        with self.cluster.connect() as conn:
            conn.execute("UPDATE job_queue_config SET max_concurrent_renders = %s, max_manim_renders = %s",
                         (args.limit, max(1, args.limit // 2)))
        try:
            await self.cluster.start(2)
            self.say(f"soak: {args.minutes:g} min at {args.rate:g} jobs/s, 2 reactors, lease {args.lease_seconds:g} s, "
                     f"limit {args.limit}, renders {args.latency_ms:g} ms + up to {args.jitter_ms:g} ms")
            async with anyio.create_task_group() as tg:
                await tg.start(self.watcher.run)
                tg.start_soon(self.sample_rss)
                tg.start_soon(self.load)
                await self.schedule(duration)
                await anyio.sleep(max(0.0, duration - self.now()))
                self.stop_load.set()
                self.say("load stopped; waiting for every job to finish")
                await self.settle()
                tg.cancel_scope.cancel()
            return await produce_report(self)
        finally:
            await self.cluster.close()

    async def settle(self) -> None:
        await self.watch_reactors()
        await self.cluster.double.control(latency_ms=self.args.latency_ms, jitter_ms=self.args.jitter_ms,
                                          mix={"ok": 1})
        for rp in self.cluster.reactors.values():
            if rp.stopped:
                rp.send(signal.SIGCONT)
        with self.cluster.connect() as conn:
            for text in self.unconfirmed:  # inserts cut off mid-commit that did commit
                for r in conn.execute("SELECT id FROM reactor.jobs WHERE payload->>'question' = %s "
                                      "OR payload->>'topic' = %s OR payload->>'date' = %s", (text, text, text)):
                    self.inserted.append((str(r[0]), 0.0))
            ids = [job_id for job_id, _ in self.inserted]
            try:
                await until(lambda: unfinished(conn, ids) == 0, "every job finished", timeout=600, interval=0.5)
            except AssertionError as exc:
                self.say(str(exc).split("\n")[0])
            last: int = conn.execute("SELECT last_seq FROM reactor.counters").fetchone()[0]  # type: ignore[index]
        with anyio.move_on_after(60):
            await self.watcher.wait_for(last, timeout=60)
        self.watcher.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def produce_report(soak: Soak) -> int:
    cluster = soak.cluster
    ids = [job_id for job_id, _ in soak.inserted]
    requests = await cluster.double.requests()
    max_in_flight = await cluster.double.max_in_flight()
    with cluster.connect() as conn:
        ev = gather(conn, requests)
        limit: int = conn.execute("SELECT max_concurrent_renders FROM job_queue_config").fetchone()[0]  # type: ignore[index]
        errors = conn.execute(
            "SELECT floor(extract(epoch FROM at) - %s)::int / 60 AS minute, error_category, "
            "count(*) FILTER (WHERE kind = 'retrying') AS retried, count(*) FILTER (WHERE kind = 'failed') AS failed "
            "FROM reactor.events WHERE error_category IS NOT NULL AND kind IN ('retrying', 'failed') "
            "GROUP BY 1, 2 ORDER BY 1, 2", (soak.started,)).fetchall()
    # a job the double answered with garbage (orch_garbage) may have spent its retries on it
    fates = {job_id: fate | {"failed"} if any(r["outcome"] in ("garbage", "malformed")
                                              for r in ev.requests.get(job_id, [])) else fate
             for job_id, fate in soak.fates.items()}
    violations = check_all(ev, ids, limit=limit, max_in_flight=max_in_flight, allowance=soak.allowance,
                           allowance_why=", ".join(soak.allowance_why), fates=fates,
                           watchers=[soak.watcher])
    out = print
    out()
    out(f"== soak: {soak.args.minutes:g} min, {len(ids)} jobs ({len(soak.steady)} steady at {soak.args.rate:g}/s), "
        f"{len(soak.faults)} faults ==")
    out(summary(ev))
    out(f"inserts refused while the database was down: {soak.refused}")
    out("reactor crashes: " + ("none" if not soak.crashes else "; ".join(soak.crashes)))
    out(f"double: max in flight {max_in_flight} (limit {limit}, allowance {soak.allowance}: "
        f"{', '.join(soak.allowance_why) or 'none'})")
    out(f"feed watcher: {soak.watcher.connects} connections, {len(soak.watcher.resyncs)} resyncs, last seq "
        f"{soak.watcher.last_seq} of {ev.last_seq}")
    out()
    out("invariants: " + ("all hold" if not violations else f"{len(violations)} VIOLATED"))
    for v in violations:
        out(f"  - {v}")
    out()
    out("faults (recovery = until every job the fault hit is back in work; goal 45 s):")
    for f in soak.faults:
        rec = "" if f.recovery_s is None else f"recovery {f.recovery_s:5.1f} s " + \
            ("ok " if f.recovery_s <= RECOVERY_GOAL_S else "OVER GOAL ")
        hit = f"hit {f.hit:5d} " if f.hit else ""
        out(f"  t+{f.t:5.0f} s {f.name:18s} {hit}{rec}{'; '.join(f.notes)}")
    out()
    # per minute: pickup latency of steady jobs, RSS, errors
    first_render: dict[str, float] = {}
    for r in requests:
        first_render.setdefault(str(r["job_id"]), float(r["received_at"]))
    pickups: dict[int, list[float]] = defaultdict(list)
    for job_id in soak.steady:
        job = ev.jobs.get(job_id)
        if job is None or job_id not in first_render:
            continue
        created = job["created_at"].timestamp()
        pickups[int((created - soak.started) // 60)].append(first_render[job_id] - created)
    by_minute_errors: dict[int, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for minute, category, retried, failed in errors:
        by_minute_errors[int(minute)][category] += int(retried) + int(failed)
        totals[f"{category} retried"] += int(retried)
        totals[f"{category} failed"] += int(failed)
    faults_by_minute: dict[int, list[str]] = defaultdict(list)
    for f in soak.faults:
        faults_by_minute[int(f.t // 60)].append(f.name)
    reactors = sorted(soak.rss)
    header = f"{'min':>3} {'jobs':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} " + \
        " ".join(f"{'RSS ' + r:>9}" for r in reactors) + "  errors; faults"
    out(header)
    minutes = sorted(set(pickups) | set(by_minute_errors) | {int(t // 60) for r in soak.rss.values() for t, _ in r})
    for m in minutes:
        p = pickups.get(m, [])
        lat = (f"{percentile(p, 0.5) * 1000:8.1f} {percentile(p, 0.9) * 1000:8.1f} {percentile(p, 0.99) * 1000:8.1f} "
               f"{max(p) * 1000:8.1f}") if p else " " * 35
        rss = " ".join(
            f"{max((k for t, k in soak.rss[r] if int(t // 60) == m), default=0) / 1024:8.1f}M" for r in reactors)
        errs = ", ".join(f"{c} {n}" for c, n in sorted(by_minute_errors.get(m, Counter()).items()))
        out(f"{m:3d} {len(p):5d} {lat} {rss}  {errs or '-'}; {', '.join(faults_by_minute.get(m, [])) or '-'}")
    out()
    out("errors by category (events): " + (", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "none"))
    all_p = [x for v in pickups.values() for x in v]
    if all_p:
        out(f"pickup over the whole run: p50 {statistics.median(all_p) * 1000:.1f} ms, p99 "
            f"{percentile(all_p, 0.99) * 1000:.1f} ms, max {max(all_p) * 1000:.1f} ms ({len(all_p)} steady jobs)")
    return 1 if violations or soak.crashes else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    p.add_argument("--rate", type=float, default=20.0, help="steady jobs per second (default 20)")
    p.add_argument("--fault-every", type=float, default=45.0, help="seconds between faults, plus 0-15 s jitter")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"the faults in order, cycled (default {','.join(FAULTS)})")
    p.add_argument("--limit", type=int, default=20, help="max_concurrent_renders (max_manim_renders: half)")
    p.add_argument("--lease-seconds", type=float, default=3.0, help="the reactors' --lease-seconds")
    p.add_argument("--latency-ms", type=float, default=200.0, help="render latency of the double")
    p.add_argument("--jitter-ms", type=float, default=400.0, help="extra random render latency, up to this")
    p.add_argument("--burst", type=int, default=10_000, help="jobs in the burst INSERT")
    p.add_argument("--flood", type=int, default=50_000, help="NOTIFYs in the flood")
    p.add_argument("--clients", type=int, default=200, help="feed connections that vanish")
    p.add_argument("--seed", type=int, default=1, help="seed of the load and the double's mix")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) after the run")
    args = p.parse_args(argv)
    unknown = set(args.faults.split(",")) - set(FAULTS) - {""}
    if unknown:
        p.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="reactor-soak-"))
    pg = EmbeddedPostgres(settings=CHAOS_PG_SETTINGS)
    try:
        dsn = pg.start()
        migrate_up(dsn)
        async def run() -> int:
            return await Soak(args, pg, dsn, workdir).run()

        rc = anyio.run(run)
        print(f"\nlogs: {workdir}" if args.keep else "", flush=True)
        return rc
    finally:
        pg.destroy()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
