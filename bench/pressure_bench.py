#!/usr/bin/env python3
"""MVCC pressure: pickup while something pins the horizon (a pg_dump, a long Studio query).

    python3 bench/pressure_bench.py [--mode idle|pg_dump|readers] [--baseline 60] [--hold 600]
                                    [--rate 100] [--finished 1000000] [--tree PATH] [--explain]

Starts a private, durable PostgreSQL (autovacuum on, as in production), the orchestrator double
(answering at once) and one reactor, as separate processes. Jobs are inserted one at a time at
``--rate`` per second for ``--baseline`` seconds (the quiet baseline), then for ``--hold`` seconds
while the horizon is pinned, then 30 s more:

* ``idle``: one session ``BEGIN ISOLATION LEVEL REPEATABLE READ``, one read, then idle in
  transaction for the whole hold (what a long Studio query or an export does);
* ``pg_dump``: a real ``pg_dump`` of the database, which first gets ``--finished`` finished jobs
  (1,000,000 by default), its output read slowly so that the dump lasts the hold;
* ``readers``: four sessions in REPEATABLE READ transactions reading the queue every second.

Printed per minute (by the time of the INSERT): pickup p50/p99 (INSERT returned to the double
receiving ``POST /render``), INSERT p99, completions, jobs still waiting at the end of the minute,
and the dead row versions per reactor table; then the verdict against the goals of issue 18:
pickup p99 in every minute of the hold <= 2x the baseline's, INSERT p99 <= 2x, and nothing left
waiting when the hold ends. ``--explain`` writes the plans (auto_explain, ANALYZE and BUFFERS,
nested statements) of one claim, one finish and one INSERT at minute 1 and minute 8 of the hold
into the server log and prints them. ``--tree`` runs the reactor (and its migrations) of another
checkout, to compare with the code before a change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pickup import http_json, pct  # noqa: E402
from reactor_bench import free_port, stop_processes, wait_http, wait_reactor_ready  # noqa: E402

from reactor.db.embedded import EmbeddedPostgres, find_pg_bin  # noqa: E402

TABLES = ("jobs", "counters", "totals", "events", "event_stage", "pending_commits")
INSERT_SQL = "INSERT INTO jobs (job_type, payload) VALUES ('topic_short', %s) RETURNING id"


@dataclass
class Sample:
    at: float  # seconds since the start of the run, when the INSERT returned
    insert_ms: float
    job_id: str


@dataclass
class Run:
    t0: float = field(default_factory=time.time)
    samples: list[Sample] = field(default_factory=list)
    dead: dict[int, dict[str, int]] = field(default_factory=dict)
    waiting: dict[int, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)


def inserter(dsn: str, rate: float, run: Run) -> None:
    interval = 1.0 / rate
    with psycopg.connect(dsn, autocommit=True, application_name="bench inserter") as conn:
        next_at = time.perf_counter()
        i = 0
        while not run.stop.is_set():
            t = time.perf_counter()
            row = conn.execute(INSERT_SQL, (json.dumps({"topic": f"pressure {i}"}),)).fetchone()
            done = time.time()
            assert row
            run.samples.append(Sample(done - run.t0, (time.perf_counter() - t) * 1000, str(row[0])))
            i += 1
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


def watcher(dsn: str, run: Run) -> None:
    """Once a minute (of the run): dead versions per table, jobs waiting."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        minute = 0
        while not run.stop.is_set():
            target = run.t0 + 60 * (minute + 1)
            while time.time() < target and not run.stop.is_set():
                time.sleep(0.2)
            conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = conn.execute(
                "SELECT relname, n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'reactor'").fetchall()
            run.dead[minute] = {r[0]: int(r[1]) for r in rows}
            waiting = conn.execute("SELECT count(*) FROM reactor.jobs WHERE status = 'queued'").fetchone()
            run.waiting[minute] = int(waiting[0]) if waiting else -1
            minute += 1


class Holder:
    """What pins the horizon for the hold."""

    def __init__(self, mode: str, dsn: str, hold_s: float, pg_bin: Path, logdir: Path) -> None:
        self.mode, self.dsn, self.hold_s, self.pg_bin, self.logdir = mode, dsn, hold_s, pg_bin, logdir
        self.conns: list[psycopg.Connection[Any]] = []
        self.dump: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.dumped = 0

    def start(self) -> None:
        if self.mode == "idle":
            conn = psycopg.connect(self.dsn)
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute("SELECT count(*) FROM reactor.jobs WHERE status = 'queued'")
            self.conns.append(conn)
        elif self.mode == "readers":
            for _ in range(4):
                t = threading.Thread(target=self._reader, daemon=True)
                t.start()
                self.threads.append(t)
        else:
            self.dump = subprocess.Popen(
                [str(self.pg_bin / "pg_dump"), "--format=custom", "--compress=0", "--dbname", self.dsn],
                stdout=subprocess.PIPE, stderr=open(self.logdir / "pg_dump.log", "wb"),  # noqa: SIM115
            )
            t = threading.Thread(target=self._drain_slowly, daemon=True)
            t.start()
            self.threads.append(t)

    def _reader(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            while not self.stop.is_set():
                conn.execute("SELECT count(*), max(created_at) FROM reactor.jobs WHERE status = 'queued'")
                self.stop.wait(1.0)
            conn.execute("COMMIT")

    def _drain_slowly(self) -> None:
        """Read the dump slowly until the hold ends (pg_dump keeps its snapshot meanwhile), then fast."""
        assert self.dump is not None and self.dump.stdout is not None
        out = self.dump.stdout
        while not self.stop.is_set():
            chunk = out.read(16 * 1024)
            if not chunk:
                return
            self.dumped += len(chunk)
            self.stop.wait(0.05)
        while chunk := out.read(1 << 20):
            self.dumped += len(chunk)

    def end(self) -> str:
        self.stop.set()
        for conn in self.conns:
            conn.execute("COMMIT")
            conn.close()
        for t in self.threads:
            t.join(timeout=600)
        if self.dump is not None:
            rc = self.dump.wait(timeout=600)
            return f"pg_dump exit {rc}, {self.dumped / 1e6:.1f} MB"
        return self.mode


class Profiler:
    """``--profile``: per minute, where the time went: CPU seconds per process group (read from
    /proc every second) and the statements that took the most time (pg_stat_statements, nested
    statements included), with autovacuum and autoanalyze runs per table."""

    def __init__(self, dsn: str, pids: dict[str, int]) -> None:
        self.dsn, self.pids = dsn, pids  # pids: the reactor's and the double's processes
        self.cpu: dict[int, dict[str, float]] = {}
        self.statements: dict[int, dict[str, tuple[int, float, int]]] = {}
        self.vacuums: dict[int, dict[str, tuple[int, int]]] = {}
        self._last_cpu: dict[int, tuple[str, float]] = {}  # pid -> (group, cpu seconds so far)
        self.waits: dict[int, dict[tuple[str, str], int]] = {}  # minute -> (session, wait) -> samples
        self.wal: dict[int, tuple[float, ...]] = {}  # minute -> pg_stat_wal and checkpoint counters so far

    def sample_waits(self, run: Run) -> None:
        """Every 20 ms: what each active session of the bench and the reactor is doing (a wait event,
        or on CPU), counted per minute; 50 samples a second of one session are a second of it."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not run.stop.is_set():
                m = int((time.time() - run.t0) // 60)
                bucket = self.waits.setdefault(m, {})
                for app, wtype, wevent in conn.execute(
                        "SELECT application_name, wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()"
                        ).fetchall():
                    key = (app or "(none)", f"{wtype}:{wevent}" if wtype else "CPU")
                    bucket[key] = bucket.get(key, 0) + 1
                time.sleep(0.02)

    @staticmethod
    def _cpu_s(pid: int) -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _group(cmdline: str, apps: dict[int, str], pid: int) -> str:
        title = cmdline.replace("\0", " ")
        if "autovacuum" in title:
            return "pg autovacuum"
        for name in ("checkpointer", "walwriter", "background writer", "stats", "logical replication"):
            if name in title:
                return "pg background"
        if pid in apps:
            return "pg backend: " + (apps[pid] or "(no application_name)")
        return "pg other"

    def run(self, run: Run) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None
            master = int(Path(row[0], "postmaster.pid").read_text().split()[0])
            minute = -1
            apps: dict[int, str] = {}
            while not run.stop.is_set():
                m = int((time.time() - run.t0) // 60)
                if m != minute:
                    conn.execute("SELECT pg_stat_clear_snapshot()")
                    self.statements[m] = {
                        r[0]: (int(r[1]), float(r[2]), int(r[3])) for r in conn.execute(
                            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), sum(calls), "
                            "sum(total_exec_time), sum(shared_blks_hit + shared_blks_read) "
                            "FROM pg_stat_statements GROUP BY 1").fetchall()}
                    self.vacuums[m] = {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(
                        "SELECT relname, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables "
                        "WHERE schemaname = 'reactor'").fetchall()}
                    wal = conn.execute(
                        "SELECT w.wal_records, w.wal_fpi, w.wal_bytes, w.wal_sync, w.wal_sync_time, "
                        "b.checkpoints_timed + b.checkpoints_req FROM pg_stat_wal w, pg_stat_bgwriter b").fetchone()
                    assert wal is not None
                    self.wal[m] = tuple(float(v) for v in wal)
                    minute = m
                apps = {int(r[0]): r[1] or "" for r in conn.execute(
                    "SELECT pid, application_name FROM pg_stat_activity WHERE backend_type = 'client backend'"
                ).fetchall()}
                try:
                    kids = [int(k) for k in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
                except OSError:
                    kids = []
                seen: list[tuple[int, str]] = [(master, "pg background")]
                for pid in kids:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_text()
                    except OSError:
                        continue
                    seen.append((pid, self._group(cmd, apps, pid)))
                seen += [(pid, name) for name, pid in self.pids.items()]
                seen.append((os.getpid(), "bench (inserter, watcher)"))
                bucket = self.cpu.setdefault(m, {})
                for pid, group in seen:
                    now = self._cpu_s(pid)
                    if now is None:
                        continue
                    before = self._last_cpu.get(pid, (group, 0.0))[1]
                    bucket[group] = bucket.get(group, 0.0) + (now - before)
                    self._last_cpu[pid] = (group, now)
                time.sleep(1.0)

    def report(self) -> str:
        minutes = sorted(self.cpu)
        groups = sorted({g for b in self.cpu.values() for g in b})
        out = ["--- profile: CPU seconds per minute ---",
               "| group | " + " | ".join(str(m + 1) for m in minutes) + " |",
               "|---|" + "---|" * len(minutes)]
        for g in groups:
            out.append(f"| {g} | " + " | ".join(f"{self.cpu[m].get(g, 0.0):.1f}" for m in minutes) + " |")
        snaps = sorted(self.statements)
        deltas: dict[int, dict[str, tuple[int, float, int]]] = {}
        for a, b in itertools.pairwise(snaps):
            d = {}
            for q, (calls, ms, blks) in self.statements[b].items():
                c0, m0, b0 = self.statements[a].get(q, (0, 0.0, 0))
                if calls > c0:
                    d[q] = (calls - c0, ms - m0, blks - b0)
            deltas[a] = d
        if deltas:
            last = max(deltas)
            top = sorted(deltas[last], key=lambda q: -deltas[last][q][1])[:14]
            out += ["--- profile: statements, ms per call / buffers per call, per minute (top by time in the "
                    f"minute {last + 1}) ---",
                    "| statement | " + " | ".join(str(m + 1) for m in sorted(deltas)) + " |",
                    "|---|" + "---|" * len(deltas)]
            for q in top:
                cells = []
                for m in sorted(deltas):
                    c, ms, blks = deltas[m].get(q, (0, 0.0, 0))
                    cells.append(f"{ms / c:.2f}/{blks / c:.0f} x{c}" if c else "-")
                out.append(f"| `{q}` | " + " | ".join(cells) + " |")
        wm = sorted(self.waits)
        keys = sorted({k for b in self.waits.values() for k in b}, key=lambda k: -sum(
            b.get(k, 0) for b in self.waits.values()))[:12]
        out += ["--- profile: active sessions by wait event, samples per minute (every 20 ms) ---",
                "| session: wait | " + " | ".join(str(m + 1) for m in wm) + " |",
                "|---|" + "---|" * len(wm)]
        for k in keys:
            out.append(f"| {k[0]}: {k[1]} | " + " | ".join(str(self.waits[m].get(k, 0)) for m in wm) + " |")
        walm = sorted(self.wal)
        out += ["--- profile: WAL per minute (pg_stat_wal; sync ms with track_wal_io_timing) ---",
                "| | " + " | ".join(str(m + 1) for m in walm[:-1]) + " |", "|---|" + "---|" * (len(walm) - 1)]
        for i, (label, scale, fmt) in enumerate([
                ("records", 1, "{:.0f}"), ("full-page images", 1, "{:.0f}"), ("MB", 1e6, "{:.1f}"),
                ("syncs", 1, "{:.0f}"), ("sync ms each", 0, "{:.2f}"), ("checkpoints", 1, "{:.0f}")]):
            cells = []
            for a, b in itertools.pairwise(walm):
                if scale == 0:  # sync time per sync
                    n = self.wal[b][3] - self.wal[a][3]
                    cells.append(fmt.format((self.wal[b][4] - self.wal[a][4]) / n) if n else "-")
                else:
                    cells.append(fmt.format((self.wal[b][i] - self.wal[a][i]) / scale))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        vm = sorted(self.vacuums)
        out += ["--- profile: autovacuum / autoanalyze runs per minute ---"]
        for t in sorted({t for v in self.vacuums.values() for t in v}):
            runs = []
            for a, b in itertools.pairwise(vm):
                va, aa = self.vacuums[a].get(t, (0, 0))
                vb, ab = self.vacuums[b].get(t, (0, 0))
                runs.append(f"{vb - va}/{ab - aa}")
            out.append(f"{t}: " + " ".join(runs))
        return "\n".join(out)


def load_finished(dsn: str, n: int) -> None:
    """``n`` completed jobs, a month old, for the dump to carry (and the claim to ignore)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = 0
        while done < n:
            step = min(100_000, n - done)
            conn.execute(
                "INSERT INTO jobs (job_type, status, payload, result, created_at) "
                "SELECT 'topic_short', 'completed', jsonb_build_object('topic', 'old ' || g), "
                "jsonb_build_object('video_url', 'https://cdn.example/v/' || g || '.mp4'), "
                "now() - interval '30 days' FROM generate_series(1, %s) g", (step,))
            done += step
        conn.execute("VACUUM ANALYZE reactor.jobs")
        conn.execute("VACUUM ANALYZE reactor.events")


def explain(dsn: str, server_log: Path, label: str) -> str:
    """Plans of one claim, one finish (of the job claimed) and one INSERT, all rolled back."""
    start = server_log.stat().st_size
    with psycopg.connect(dsn) as conn:
        for stmt in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                     "SET auto_explain.log_analyze = on", "SET auto_explain.log_buffers = on",
                     "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_format = text"):
            conn.execute(stmt)
        conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"explain\"}')")
        rows = conn.execute("SELECT id, attempt FROM reactor.claim_jobs('explain', 1, interval '30 s')").fetchall()
        if rows:
            batch = json.dumps([{"id": str(rows[0][0]), "attempt": rows[0][1], "status": "completed",
                                 "result": {"video_url": "https://x/v.mp4"}, "retry_count": 0, "delay_s": 0,
                                 "error_category": None, "error_message": None, "error_details": None}])
            conn.execute("SELECT * FROM reactor.finish_and_claim(%s::jsonb, 'explain', 0, interval '30 s')", (batch,))
        conn.rollback()
    time.sleep(0.5)
    with open(server_log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    keep = [line for line in text.splitlines() if "duration:" in line or line.startswith(("\t", " "))]
    return f"--- plans at {label} ---\n" + "\n".join(keep[:400])


def minute_table(run: Run, reqs: list[dict[str, Any]], completed: dict[int, int], baseline_s: float,
                 hold_s: float) -> tuple[list[str], dict[str, Any]]:
    received = {r["job_id"]: float(r["received_at"]) for r in reqs}
    by_minute: dict[int, list[Sample]] = {}
    for s in run.samples:
        by_minute.setdefault(int(s.at // 60), []).append(s)
    lines = ["| minute | phase | inserted | pickup p50 / p99 ms | not picked up | INSERT p99 ms | completed | "
             "waiting at end | dead versions (jobs, counters, totals, events, stage, pending) |",
             "|---|---|---|---|---|---|---|---|---|"]
    base_p99: list[float] = []
    base_ins: list[float] = []
    hold_rows: list[tuple[float, float]] = []
    for m in sorted(by_minute):
        samples = by_minute[m]
        lat = [(received[s.job_id] - (run.t0 + s.at)) * 1000 for s in samples if s.job_id in received]
        missing = len(samples) - len(lat)
        ins = [s.insert_ms for s in samples]
        start = m * 60
        phase = "quiet" if start + 60 <= baseline_s else "hold" if start < baseline_s + hold_s else "after"
        p50, p99, ip99 = pct(lat, 50), pct(lat, 99), pct(ins, 99)
        if phase == "quiet":
            base_p99 += lat
            base_ins += ins
        elif phase == "hold":
            hold_rows.append((p99 if not missing else float("inf"), ip99))
        dead = run.dead.get(m, {})
        dead_s = ", ".join(str(dead.get(t, "-")) for t in TABLES)
        lines.append(f"| {m + 1} | {phase} | {len(samples)} | {p50:.1f} / {p99:.1f} | {missing} | {ip99:.1f} | "
                     f"{completed.get(m, 0)} | {run.waiting.get(m, '-')} | {dead_s} |")
    quiet_p99, quiet_ins = pct(base_p99, 99), pct(base_ins, 99)
    worst = max((r[0] for r in hold_rows), default=float("nan"))
    worst_ins = max((r[1] for r in hold_rows), default=float("nan"))
    hold_end_minute = int((baseline_s + hold_s) // 60) - 1
    waiting_end = run.waiting.get(hold_end_minute, -1)
    verdict = {
        "baseline_pickup_p99_ms": quiet_p99, "worst_hold_pickup_p99_ms": worst,
        "baseline_insert_p99_ms": quiet_ins, "worst_hold_insert_p99_ms": worst_ins,
        "waiting_when_hold_ends": waiting_end,
        "pickup_ok": worst <= 2 * quiet_p99, "insert_ok": worst_ins <= 2 * quiet_ins,
        "kept_up": 0 <= waiting_end <= 10,
    }
    return lines, verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["idle", "pg_dump", "readers"], default="idle")
    ap.add_argument("--baseline", type=float, default=60.0, help="quiet seconds first (default 60)")
    ap.add_argument("--hold", type=float, default=600.0, help="seconds the horizon is pinned (default 600)")
    ap.add_argument("--rate", type=float, default=100.0, help="jobs inserted per second (default 100)")
    ap.add_argument("--finished", type=int, default=1_000_000, help="finished jobs loaded for --mode pg_dump")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose reactor and migrations run")
    ap.add_argument("--explain", action="store_true", help="plans at minute 1 and 8 of the hold")
    ap.add_argument("--profile", action="store_true",
                    help="per minute: CPU per process group, the costliest statements, active sessions by wait "
                         "event (sampled every 20 ms), autovacuum runs")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting for the run (repeatable), e.g. --set autovacuum=off")
    args = ap.parse_args()
    tree = args.tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree)}

    with tempfile.TemporaryDirectory(prefix="reactor-pressure-") as tmp:
        logdir = Path(tmp)
        # durable, with autovacuum: as in production
        settings = {"max_connections": "300", "shared_buffers": "128MB"}
        if args.profile:
            settings |= {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all",
                         "track_wal_io_timing": "on"}
        settings |= dict(kv.split("=", 1) for kv in args.set)
        server = EmbeddedPostgres(settings=settings)
        dsn = server.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            subprocess.run([sys.executable, "-m", "reactor", "migrate", "--dsn", dsn], cwd=tree, env=env,
                           check=True, stdout=subprocess.DEVNULL)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET log_line_prefix = '%m|%p| '")
                conn.execute("SELECT pg_reload_conf()")
                conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 50, max_manim_renders = 50")
                if args.profile:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            if args.mode == "pg_dump":
                t = time.monotonic()
                load_finished(dsn, args.finished)
                print(f"loaded {args.finished:,} finished jobs in {time.monotonic() - t:.0f} s", flush=True)
            orch_port = free_port()
            orch_url = f"http://127.0.0.1:{orch_port}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "reactor", "--log-level", "WARNING", "dev-orchestrator", "--port",
                 str(orch_port)], cwd=tree, env=env, stdout=open(logdir / "orch.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT))
            wait_http(f"{orch_url}/health")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "reactor", "--log-level", "WARNING", "run", "--dsn", dsn,
                 "--orchestrator-url", orch_url], cwd=tree, env=env,
                stdout=open(logdir / "reactor.log", "wb"), stderr=subprocess.STDOUT))  # noqa: SIM115
            wait_reactor_ready(dsn)
            run = Run()
            threads = [threading.Thread(target=inserter, args=(dsn, args.rate, run), daemon=True),
                       threading.Thread(target=watcher, args=(dsn, run), daemon=True)]
            profiler = Profiler(dsn, {"reactor (python)": procs[1].pid, "double (python)": procs[0].pid})
            if args.profile:
                threads.append(threading.Thread(target=profiler.run, args=(run,), daemon=True))
                threads.append(threading.Thread(target=profiler.sample_waits, args=(run,), daemon=True))
            for th in threads:
                th.start()
            print(f"tree {tree}, mode {args.mode}: quiet {args.baseline:.0f} s, hold {args.hold:.0f} s, "
                  f"{args.rate:g} jobs/s", flush=True)
            time.sleep(max(0.0, run.t0 + args.baseline - time.time()))
            holder = Holder(args.mode, dsn, args.hold, find_pg_bin(), logdir)
            holder.start()
            print(f"holder started at {time.time() - run.t0:.0f} s", flush=True)
            plans: list[str] = []
            server_log = server.log_file
            for minute in (1, 8):
                if args.explain and minute * 60 < args.hold:
                    time.sleep(max(0.0, run.t0 + args.baseline + minute * 60 - 30 - time.time()))
                    plans.append(explain(dsn, server_log, f"minute {minute} of the hold"))
            time.sleep(max(0.0, run.t0 + args.baseline + args.hold - time.time()))
            ended = holder.end()
            print(f"holder ended at {time.time() - run.t0:.0f} s: {ended}", flush=True)
            time.sleep(30)
            run.stop.set()
            for th in threads:
                th.join(timeout=120)
            time.sleep(3)
            reqs = http_json(f"{orch_url}/requests")
            with psycopg.connect(dsn, autocommit=True) as conn:
                completed = {int(r[0]): int(r[1]) for r in conn.execute(
                    "SELECT floor((extract(epoch FROM completed_at) - %s) / 60)::int, count(*) "
                    "FROM reactor.jobs WHERE status = 'completed' AND completed_at > to_timestamp(%s) GROUP BY 1",
                    (run.t0, run.t0)).fetchall()}
            lines, verdict = minute_table(run, reqs, completed, args.baseline, args.hold)
            print("\n".join(lines))
            for p in plans:
                print(p)
            if args.profile:
                print(profiler.report())
            print(json.dumps(verdict, indent=1))
            ok = verdict["pickup_ok"] and verdict["insert_ok"] and verdict["kept_up"]
            print("VERDICT:", "PASS" if ok else "FAIL")
            return 0 if ok else 1
        finally:
            stop_processes(procs)
            server.destroy()


if __name__ == "__main__":
    sys.exit(main())
