"""A chaos harness: a private PostgreSQL, the orchestrator double and reactors as real processes,
the faults to inject into them, a feed client that records what it saw, and the invariants.

Used by the chaos suite (``tests/chaos``) and the soak (``bench/soak.py``). Everything here drives
real processes: reactors are ``python -m reactor run ... --listen`` children, the double is
``python -m reactor dev-orchestrator --port N`` (so it can be killed and started again on the same
port), and the database is an ``EmbeddedPostgres`` the caller owns and may restart.

The invariants are functions that return a list of violations (plain sentences), empty when all
is well, so that a test can assert on them and the soak can print them. The rules:

``check_jobs``
    Every job inserted is still there (none lost, none unexpected), and each one reached a final
    state (completed, failed, cancelled) or is legitimately queued: a retry whose ``run_after`` is
    still ahead. With ``settled=False`` a job may also be processing under a lease that has not
    expired (work in progress at the time of the check). A failed job failed for a reason that is
    not retried (INVALID_INPUT, NOT_FOUND) or after spending its retries. A completed job carries a
    result, and the double has answered ``ok`` to at least one render of it. When the caller gives
    each job's expected final states (its "fate", chosen by the double's markers), they must match.

``check_renders`` (nothing rendered twice, except where a lease was lost)
    For every job, the renders the double answered with a video (``outcome == "ok"``, answered,
    not aborted) are at most ``1 + takeovers + lost_claims``, where
    *takeovers* = the job's events by a sweep (actor ``reactor:<id>:sweep``, kind ``retrying`` or
    ``failed``): the sweep took the job from a holder whose lease expired (crashed, cut off or
    stopped reactor; or past ``job_timeout_minutes``), so that holder's render may still have been
    answered; and *lost_claims* = renders the double received beyond the job's ``started`` events:
    claims that vanished from the log. Those are violations themselves unless the caller says claims
    may be lost (``lost_claims_ok``: a reactor that commits its claims asynchronously, as this one
    did until the chaos suite showed what a crash then does, and a database crash). Retries after
    an error (500, garbage, reset, 503 outage release, drain release) never count: none of those
    renders produced a video. And no job has two ``completed`` events.

``check_leases`` (a zombie cannot overwrite)
    Every outcome a reactor wrote (``completed``, ``failed``, or ``retrying`` not by a sweep) is by
    the actor of the job's latest ``started`` event: the lease check in ``finish_and_claim`` must
    discard the outcome of an attempt that was taken over.

``check_limit``
    The most renders the double ever had in flight (``/stats`` ``max_in_flight``, the maximum over
    each of its lives) is at most ``max_concurrent_renders`` plus an allowance the scenario states:
    renders of a zombie (a reactor SIGSTOPped past its lease keeps its connections open, so the
    double counts those renders in flight while the sweep hands the jobs to others) and, with
    ``lost_claims_ok``, renders of claims lost in a database crash. Reactors SIGKILLed or stopped
    by SIGTERM need none: their sockets close and the double stops counting at once.

``check_feed``
    A feed client (admin: it sees every event) saw, on each connection, a contiguous run of seqs
    starting right after its snapshot's seq (or the ``since`` it resumed from): no gap, no
    duplicate. A reconnect with ``?since=N`` resumed exactly at N + 1, so the union covers every
    seq from the first snapshot to the end of the log, unless the server announced a ``resync``
    (allowed only where the scenario says so). Every event it saw matches the database's event
    log at that seq (same job, same kind): a seq the server sent can never come to mean another
    event. Events seen before a ``resync`` are exempt (the server told the client to drop them).

Reactor processes must not die on their own either: ``ReactorProcess.crashed()`` says why one
exited when nobody killed it (the soak reports it and starts it again).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import psycopg
from anyio.abc import TaskStatus
from psycopg.rows import dict_row
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from reactor.db.embedded import FAST_SETTINGS, EmbeddedPostgres
from tests.support.processes import (
    PATIENCE_S,
    REPO,
    Conn,
    ReactorProcess,
    child_env,
    start_reactor_process,
    until,
)

__all__ = [
    "CHAOS_PG_SETTINGS",
    "FATES",
    "INPUT_FIELD",
    "JWT_SECRET",
    "Cluster",
    "Evidence",
    "FeedWatcher",
    "OrchestratorProcess",
    "admin_token",
    "check_all",
    "check_feed",
    "check_jobs",
    "check_leases",
    "check_limit",
    "check_renders",
    "feed_clients",
    "free_port",
    "gather",
    "held_by",
    "insert_jobs",
    "insert_one",
    "kill_listeners",
    "lost_claims",
    "mixed_job",
    "not_back_in_work",
    "not_restarted",
    "notify_flood",
    "running_cluster",
    "summary",
    "unfinished",
    "vanishing_clients",
    "verify",
    "wait_finished",
]

logger = logging.getLogger(__name__)

JWT_SECRET = "chaos-harness-jwt-secret-0123456789abcdef"
#: the chaos database: throwaway (fsync off) but every commit the server's own is synchronous, so
#: an immediate shutdown loses only what a client chose to commit asynchronously (the reactor's
#: claims), not the test's inserts
CHAOS_PG_SETTINGS: Mapping[str, str] = {**FAST_SETTINGS, "synchronous_commit": "on", "max_connections": "300"}

FINAL = frozenset({"completed", "failed", "cancelled"})
NOT_RETRIED = frozenset({"INVALID_INPUT", "NOT_FOUND"})
INPUT_FIELD = {"doubt": "question", "topic_short": "topic", "daily_ca": "date"}

#: what a job's double marker makes of it: marker text, final states it may end in
FATES: Mapping[str, tuple[str, frozenset[str]]] = {
    "plain": ("", frozenset({"completed"})),
    "status500": ("[[status=500]]", frozenset({"failed"})),
    "fail_first": ("[[fail_first=1:status=503]]", frozenset({"completed"})),
    "status400": ("[[status=400]]", frozenset({"failed"})),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def admin_token(secret: str = JWT_SECRET, ttl_s: float = 24 * 3600) -> str:
    """An HS256 service_role token: an admin of the feed, who sees every event."""
    return jwt.encode({"role": "service_role", "exp": int(time.time() + ttl_s)}, secret, algorithm="HS256")


# -- the orchestrator double as a process ---------------------------------------------------------


class OrchestratorProcess:
    """``python -m reactor dev-orchestrator --port N`` as a child that can be killed and started
    again on the same port. Its records die with it, so before a kill they are read and kept:
    ``requests()`` and ``max_in_flight()`` cover every life of the double."""

    def __init__(self, log_dir: Path, *, latency_ms: float = 0, jitter_ms: float = 0,
                 seed: int | None = None, port: int | None = None) -> None:
        self.log_dir = log_dir
        self.port = port or free_port()
        self.base_latency = {"latency_ms": latency_ms, "jitter_ms": jitter_ms}
        self.base_args = ["--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms)]
        if seed is not None:
            self.base_args += ["--seed", str(seed)]
        #: /control settings changed at run time, applied again after a restart
        self.settings: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self._history: list[dict[str, Any]] = []
        self._max_before = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            text = (self.log_dir / "double.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return text[-tail:]

    async def start(self) -> None:
        assert not self.running
        self.lives += 1
        self.proc = self._spawn()
        deadline = time.monotonic() + PATIENCE_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the double exited at start ({self.proc.returncode}):\n{self.log()}")
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the double did not answer /health:\n{self.log()}")
            await anyio.sleep(0.05)
        if self.settings:
            await self._post("/control", self.settings)

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "reactor", "--log-level", "WARNING", "dev-orchestrator",
                "--port", str(self.port), *self.base_args]
        with open(self.log_dir / "double.log", "ab") as log:
            return subprocess.Popen(args, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)

    async def kill(self) -> None:
        """SIGKILL mid-render. First nothing new is answered (latency raised to an hour) and the
        renders already under way (whose latency was drawn when they arrived) get their answers;
        then its records are read and kept, then it dies: renders in flight are cut off unanswered.
        (A render with its own ``[[latency=N]]`` marker may still slip between the two.)"""
        assert self.proc is not None and self.running
        now = {**self.base_latency, **self.settings}
        await self._post("/control", {"latency_ms": 3_600_000, "jitter_ms": 0})
        await anyio.sleep((float(now["latency_ms"]) + float(now["jitter_ms"])) / 1000 + 0.3)
        await self._keep_records()
        self.proc.kill()
        self.proc.wait(timeout=30)

    async def stop(self) -> None:
        """SIGTERM (records kept): the double closes every connection and exits."""
        if self.proc is None or not self.running:
            return
        await self._keep_records()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    async def _keep_records(self) -> None:
        stats, records = await self._get("/stats"), await self._get("/requests")
        self._max_before = max(self._max_before, int(stats["max_in_flight"]))
        for r in records:
            r["life"] = self.lives
        self._history.extend(records)

    async def _get(self, path: str) -> Any:
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.get(self.url + path)
            response.raise_for_status()
            return response.json()

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(self.url + path, json=dict(body))
            response.raise_for_status()
            return response.json()

    async def control(self, **settings: Any) -> None:
        """``POST /control``; remembered, so a restarted double behaves the same."""
        self.settings.update(settings)
        await self._post("/control", settings)

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self._get("/stats")
        return stats

    async def requests(self) -> list[dict[str, Any]]:
        """Every render received, over every life of the double."""
        current: list[dict[str, Any]] = await self._get("/requests") if self.running else []
        return [*self._history, *current]

    async def max_in_flight(self) -> int:
        current = int((await self.stats())["max_in_flight"]) if self.running else 0
        return max(self._max_before, current)


# -- the cluster ----------------------------------------------------------------------------------


class Cluster:
    """Reactors (``python -m reactor run --listen``) and the double around one database.

    The caller owns ``pg`` (and may restart it); ``close()`` kills every child this object started.
    """

    def __init__(self, pg: EmbeddedPostgres, dsn: str, workdir: Path, *, lease_s: float = 3.0,
                 latency_ms: float = 0, jitter_ms: float = 0, seed: int | None = None,
                 reactor_options: Sequence[str] = ()) -> None:
        self.pg = pg
        self.dsn = dsn
        self.dbname = dsn.rsplit("/", 1)[1]
        self.workdir = workdir
        self.lease_s = lease_s
        self.reactor_options = list(reactor_options)
        self.double = OrchestratorProcess(workdir, latency_ms=latency_ms, jitter_ms=jitter_ms, seed=seed)
        self.reactors: dict[str, ReactorProcess] = {}
        #: every reactor process ever started (killed ones too): their logs and pids
        self.all_reactors: list[ReactorProcess] = []
        self._options: dict[str, list[str]] = {}
        self.token = admin_token()

    async def start(self, reactors: int = 2) -> None:
        await self.double.start()
        for i in range(reactors):
            self.add_reactor(f"r{i + 1}")
        await self.wait_ready()

    def add_reactor(self, reactor_id: str, *options: str) -> ReactorProcess:
        """Start a reactor (``options`` added to its command line, and kept for a restart)."""
        assert reactor_id not in self.reactors or not self.reactors[reactor_id].alive
        self._options[reactor_id] = list(options)
        rp = start_reactor_process(
            self.dsn, self.double.url, self.workdir, reactor_id,
            "--lease-seconds", str(self.lease_s), *self.reactor_options, *options,
            env={"REACTOR_JWT_SECRET": JWT_SECRET}, feed_port=free_port(),
        )
        self.reactors[reactor_id] = rp
        self.all_reactors.append(rp)
        return rp

    async def wait_ready(self, timeout: float = PATIENCE_S) -> None:
        for rp in list(self.reactors.values()):
            if rp.alive and not rp.stopped:
                await rp.wait_ready(timeout)

    async def restart_reactor(self, reactor_id: str) -> ReactorProcess:
        """Start a reactor again under the same id (after a kill), and wait for it."""
        self.reactors[reactor_id].kill()
        rp = self.add_reactor(reactor_id, *self._options.get(reactor_id, []))
        await rp.wait_log('msg="reactor ready"')
        return rp

    def live_reactors(self) -> list[ReactorProcess]:
        return [rp for rp in self.reactors.values() if rp.alive and not rp.stopped]

    def feed_urls(self) -> list[str]:
        return [rp.feed_url for rp in self.live_reactors()]

    def connect(self) -> Conn:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)

    def diag(self, tail: int = 3000) -> str:
        return "".join(rp.diag() for rp in self.reactors.values()) + f"\n--- double ---\n{self.double.log(tail)}"

    async def close(self) -> None:
        for rp in self.all_reactors:
            rp.kill()
        self.double.close()

    async def stop_gracefully(self, timeout: float = PATIENCE_S) -> None:
        """SIGTERM every reactor (continuing stopped ones first) and wait for them to exit."""
        for rp in self.reactors.values():
            if rp.alive:
                if rp.stopped:
                    rp.send(signal.SIGCONT)
                rp.send(signal.SIGTERM)
        for rp in self.reactors.values():
            await rp.wait_exit(timeout)


# -- jobs -----------------------------------------------------------------------------------------


def insert_jobs(conn: Conn, n: int, *, text: str = "chaos", job_type: str = "topic_short",
                priority: str = "medium") -> list[str]:
    """``n`` jobs in one INSERT; their ids."""
    rows = conn.execute(
        "INSERT INTO jobs (job_type, priority, payload) "
        "SELECT %s, %s, jsonb_build_object(%s::text, %s || ' #' || g) FROM generate_series(1, %s) g RETURNING id",
        (job_type, priority, INPUT_FIELD[job_type], text, n)).fetchall()
    return [str(r[0]) for r in rows]


def insert_one(conn: Conn, text: str, *, job_type: str = "topic_short", priority: str = "medium") -> str:
    row = conn.execute(
        "INSERT INTO jobs (job_type, priority, payload) VALUES (%s, %s, jsonb_build_object(%s::text, %s::text)) "
        "RETURNING id", (job_type, priority, INPUT_FIELD[job_type], text)).fetchone()
    assert row
    return str(row[0])


def mixed_job(rng: random.Random, n: int) -> tuple[str, str, str, str]:
    """One job of a mixed load: (job_type, priority, input text, fate)."""
    job_type = rng.choices(["doubt", "topic_short", "daily_ca"], [5, 4, 1])[0]
    priority = rng.choices(["high", "medium", "low"], [1, 3, 1])[0]
    fate = rng.choices(list(FATES), [88, 4, 5, 3])[0]
    marker = FATES[fate][0]
    return job_type, priority, f"{marker} soak job {n}".strip(), fate


# -- faults ---------------------------------------------------------------------------------------


def kill_listeners(conn: Conn, dbname: str) -> int:
    """``pg_terminate_backend`` on every reactor's LISTEN backend in ``dbname``; how many."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'reactor listener' AND datname = %s", (dbname,)).fetchall()
    return sum(1 for r in rows if r[0])


def listeners(conn: Conn, dbname: str) -> int:
    n: int = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reactor listener' AND datname = %s",
        (dbname,)).fetchone()[0]  # type: ignore[index]
    return n


def notify_flood(dsn: str, n: int, payload: str = '{"seq":0,"n":0}') -> float:
    """``n`` NOTIFYs on reactor_events, each in its own transaction (identical payloads in one
    transaction would be folded into one); returns the seconds it took."""
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN FOR i IN 1.." + str(int(n)) + " LOOP "
            "PERFORM pg_notify('reactor_events', " + "'" + payload.replace("'", "''") + "'); COMMIT; "
            "END LOOP; END $$")
    return time.monotonic() - started


async def vanishing_clients(urls: Sequence[str], n: int, token: str) -> int:
    """Open ``n`` authenticated feed connections, wait for each one's first message, then drop them
    all without a close handshake (the transport is aborted). Returns how many got their snapshot."""
    conns: list[ClientConnection] = []
    got = 0
    try:
        for i in range(n):
            ws = await connect(urls[i % len(urls)], additional_headers={"Authorization": f"Bearer {token}"},
                               open_timeout=30, ping_interval=None)
            conns.append(ws)
        for ws in conns:
            with anyio.move_on_after(30):
                if json.loads(await ws.recv())["type"] == "snapshot":
                    got += 1
    finally:
        for ws in conns:
            ws.transport.abort()
    return got


# -- the feed watcher -----------------------------------------------------------------------------


@dataclass
class Segment:
    """What one connection delivered: events after ``base`` (its snapshot's seq or its since)."""

    how: str  # snapshot | resumed | resync
    base: int
    url: str
    seqs: list[int] = field(default_factory=list)
    heartbeat: int = 0
    epoch: int = 0  # how many resyncs came before it

    @property
    def last(self) -> int:
        return max(self.base, self.seqs[-1] if self.seqs else self.base, self.heartbeat)


class FeedWatcher:
    """An admin feed client that records every seq and reconnects with ``?since=`` when dropped.

    It connects to the first of ``urls()`` (the live reactors), and after any drop to the next one
    that answers, resuming from the last seq it saw (an event's or a heartbeat's).
    """

    def __init__(self, urls: Callable[[], Sequence[str]], token: str, *, name: str = "watcher") -> None:
        self.urls = urls
        self.token = token
        self.name = name
        self.segments: list[Segment] = []
        #: seq -> (job id, kind) of every event seen since the last resync (a resync starts afresh)
        self.seen: dict[int, tuple[str, str]] = {}
        self.epoch = 0
        self.duplicates: list[int] = []
        self.drops: list[str] = []
        self.connects = 0
        self.resyncs: list[str] = []
        self._scope = anyio.CancelScope()
        self._turn = 0

    @property
    def last_seq(self) -> int:
        return self.segments[-1].last if self.segments else -1

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch until ``stop()``; ``task_status.started()`` after the first connection's first message."""
        started = False
        with self._scope:
            while True:
                urls = list(self.urls())
                if not urls:
                    await anyio.sleep(0.2)
                    continue
                url = urls[self._turn % len(urls)]
                since = self.segments[-1].last if self.segments else None
                target = url if since is None else f"{url}?since={since}"
                try:
                    async with connect(target, additional_headers={"Authorization": f"Bearer {self.token}"},
                                       open_timeout=10, max_size=None, max_queue=None) as ws:
                        self.connects += 1
                        with anyio.fail_after(30):
                            first = json.loads(await ws.recv())
                        self._begin(first, url, since)
                        if not started:
                            started = True
                            task_status.started()
                        async for raw in ws:
                            self._on(json.loads(raw), url)
                        self.drops.append(f"{url}: closed {ws.close_code} {ws.close_reason}")
                except (OSError, TimeoutError, InvalidHandshake, InvalidStatus) as exc:
                    self.drops.append(f"{url}: cannot connect: {exc!r}"[:200])
                    self._turn += 1
                except ConnectionClosed as exc:
                    self.drops.append(f"{url}: dropped: {exc!r}"[:200])
                    self._turn += 1
                await anyio.sleep(0.2)

    def _begin(self, msg: dict[str, Any], url: str, since: int | None) -> None:
        kind = msg.get("type")
        if kind == "snapshot":
            self.segments.append(Segment("snapshot", int(msg["seq"]), url, epoch=self.epoch))
        elif kind == "resumed":
            assert since is not None
            if int(msg["since"]) != since:
                self.resyncs.append(f"resumed from {msg['since']}, asked for {since}")
            self.segments.append(Segment("resumed", int(msg["since"]), url, epoch=self.epoch))
        elif kind == "resync":
            self._resync(url, msg)
        else:
            raise AssertionError(f"{self.name}: first message {msg!r}")

    def _on(self, msg: dict[str, Any], url: str) -> None:
        kind = msg.get("type")
        seg = self.segments[-1]
        if kind == "event":
            seq = int(msg["seq"])
            if seq in self.seen:
                self.duplicates.append(seq)
            self.seen[seq] = (str(msg["job"]["id"]), str(msg["kind"]))
            seg.seqs.append(seq)
        elif kind == "heartbeat":
            seg.heartbeat = max(seg.heartbeat, int(msg["seq"]))
        elif kind == "resync":
            self._resync(url, msg)
        elif kind == "snapshot":
            if seg.how == "resync" and seg.base == -1:
                seg.base = int(msg["seq"])
            else:
                self.segments.append(Segment("snapshot", int(msg["seq"]), url, epoch=self.epoch))

    def _resync(self, url: str, msg: dict[str, Any]) -> None:
        """The server says: forget what you have, a fresh snapshot follows."""
        self.resyncs.append(f"{url}: {msg.get('reason')}")
        self.epoch += 1
        self.seen = {}
        self.segments.append(Segment("resync", -1, url, epoch=self.epoch))

    async def wait_for(self, seq: int, timeout: float = PATIENCE_S) -> None:
        await until(lambda: self.last_seq >= seq, f"{self.name} to reach seq {seq}", timeout=timeout,
                    diag=lambda: f" (at {self.last_seq}; drops {self.drops[-3:]})")


# -- evidence and invariants ----------------------------------------------------------------------


@dataclass
class Evidence:
    """What the checks read: the jobs, their events, the double's records."""

    jobs: dict[str, dict[str, Any]]
    events: dict[str, list[dict[str, Any]]]  # job id -> its events in seq order
    log: dict[int, tuple[str, str]]  # seq -> (job id, kind)
    last_seq: int
    requests: dict[str, list[dict[str, Any]]]  # job id -> the double's records of its renders
    max_retries_default: int = 3


def gather(conn: Conn, requests: Iterable[dict[str, Any]]) -> Evidence:
    with conn.cursor(row_factory=dict_row) as cur:
        jobs = {str(r["id"]): r for r in cur.execute(
            "SELECT id, status, retry_count, max_retries, attempt, locked_by, lease_expires_at, "
            "lease_expires_at < now() AS lease_expired, run_after > now() AS waiting, error_category, "
            "result, created_at, payload FROM reactor.jobs")}
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        log: dict[int, tuple[str, str]] = {}
        for r in cur.execute("SELECT seq, job_id, kind, status, actor, error_category, retry_count, at "
                             "FROM reactor.events ORDER BY seq"):
            events[str(r["job_id"])].append(r)
            log[int(r["seq"])] = (str(r["job_id"]), str(r["kind"]))
        last = cur.execute("SELECT last_seq FROM reactor.counters").fetchone()
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for req in requests:
        by_job[str(req["job_id"])].append(req)
    return Evidence(jobs, dict(events), log, int(last["last_seq"]) if last else 0, dict(by_job))


def _short(job_id: str) -> str:
    return job_id[:8]


def _first(violations: list[str], limit: int = 20) -> list[str]:
    if len(violations) <= limit:
        return violations
    return [*violations[:limit], f"... and {len(violations) - limit} more"]


def check_jobs(ev: Evidence, inserted: Collection[str], *, settled: bool = True,
               fates: Mapping[str, Collection[str]] | None = None) -> list[str]:
    out: list[str] = []
    ids = set(inserted)
    missing = ids - ev.jobs.keys()
    if missing:
        out.append(f"{len(missing)} of {len(ids)} inserted jobs are gone, e.g. {sorted(missing)[:3]}")
    extra = ev.jobs.keys() - ids
    if extra:
        out.append(f"{len(extra)} jobs nobody inserted, e.g. {sorted(extra)[:3]}")
    for job_id in sorted(ids & ev.jobs.keys()):
        j = ev.jobs[job_id]
        status = j["status"]
        s = _short(job_id)
        if status == "processing":
            if settled or j["lease_expired"] or j["lease_expires_at"] is None:
                out.append(f"job {s} still processing (locked_by {j['locked_by']}, lease expired "
                           f"{j['lease_expired']})")
            continue
        if status == "queued":
            if settled and not j["waiting"]:
                out.append(f"job {s} still queued and due (retry_count {j['retry_count']}): nobody took it")
            continue
        if status == "failed" and j["error_category"] not in NOT_RETRIED and j["retry_count"] < j["max_retries"]:
            out.append(f"job {s} failed with {j['error_category']} after {j['retry_count']} of "
                       f"{j['max_retries']} retries")
        if status == "completed":
            if not j["result"] or "video_url" not in j["result"]:
                out.append(f"job {s} completed without a result")
            # a job completed from the render cache (migration 0013) shows the render of its source
            source = str((j["result"] or {}).get("cached_from") or job_id)
            oks = [r for r in ev.requests.get(source, []) if r["outcome"] == "ok" and r["answered_at"]]
            if not oks:
                out.append(f"job {s} completed but the double never answered a render of it"
                           + (f" (nor of {_short(source)}, its cached_from)" if source != job_id else ""))
        if fates is not None and job_id in fates and status not in fates[job_id]:
            out.append(f"job {s} ended {status} ({j['error_category']}), expected {sorted(fates[job_id])}")
    return _first(out)


def _takeovers(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e["kind"] in ("retrying", "failed") and str(e["actor"]).endswith(":sweep"))


def lost_claims(ev: Evidence, job_id: str) -> int:
    """Renders the double received for ``job_id`` beyond the job's ``started`` events: claims the
    log no longer has (lost in a database crash)."""
    started = sum(1 for e in ev.events.get(job_id, []) if e["kind"] == "started")
    return max(0, len(ev.requests.get(job_id, [])) - started)


def check_renders(ev: Evidence, *, lost_claims_ok: bool = False) -> list[str]:
    out: list[str] = []
    for job_id, reqs in ev.requests.items():
        events = ev.events.get(job_id, [])
        videos = sum(1 for r in reqs if r["outcome"] == "ok" and r["answered_at"] and not r["aborted"])
        lost = lost_claims(ev, job_id)
        if lost and not lost_claims_ok:
            out.append(f"job {_short(job_id)}: the double received {len(reqs)} renders but the log has only "
                       f"{len(reqs) - lost} started events: a claim vanished")
        allowed = 1 + _takeovers(events) + lost
        if videos > allowed:
            out.append(f"job {_short(job_id)} rendered {videos} times (allowed {allowed}: "
                       f"{_takeovers(events)} takeovers, {lost} lost claims); events "
                       f"{[(e['kind'], e['actor']) for e in events]}")
        completions = sum(1 for e in events if e["kind"] == "completed")
        if completions > 1:
            out.append(f"job {_short(job_id)} completed {completions} times")
    return _first(out)


def check_leases(ev: Evidence) -> list[str]:
    out: list[str] = []
    for job_id, events in ev.events.items():
        holder: str | None = None
        for e in events:
            actor = str(e["actor"])
            if e["kind"] == "started":
                holder = actor
            elif e["kind"] in ("completed", "failed", "retrying") and actor.startswith("reactor:") \
                    and not actor.endswith(":sweep"):
                if actor != holder:
                    out.append(f"job {_short(job_id)}: {e['kind']} (seq {e['seq']}) written by {actor}, "
                               f"but the attempt was held by {holder}")
                holder = None
    return _first(out)


def check_limit(max_in_flight: int, limit: int, allowance: int = 0, why: str = "") -> list[str]:
    if max_in_flight <= limit + allowance:
        return []
    extra = f" + {allowance} allowed ({why})" if allowance else ""
    return [f"the double had {max_in_flight} renders in flight at once; the limit is {limit}{extra}"]


def check_feed(watcher: FeedWatcher, ev: Evidence, *, allow_resync: bool = False) -> list[str]:
    """See the module docstring. Events seen before a ``resync`` are not compared with the log: the
    server told the client to drop them."""
    out: list[str] = []
    name = watcher.name
    if not watcher.segments:
        return [f"{name} never connected ({watcher.drops[-3:]})"]
    if watcher.duplicates:
        out.append(f"{name} got {len(watcher.duplicates)} seqs twice, e.g. {watcher.duplicates[:5]}")
    if watcher.resyncs and not allow_resync:
        out.append(f"{name} was resynced: {watcher.resyncs[:3]}")
    prev: Segment | None = None
    for i, seg in enumerate(watcher.segments):
        want = list(range(seg.base + 1, seg.base + 1 + len(seg.seqs)))
        if seg.seqs != want:
            bad = next(k for k, (a, b) in enumerate(zip(seg.seqs, want, strict=True)) if a != b)
            out.append(f"{name} connection {i + 1} ({seg.how} after {seg.base}, {seg.url}): seq "
                       f"{seg.seqs[bad]} where {want[bad]} was due (got {seg.seqs[max(0, bad - 2):bad + 3]})")
        if seg.how == "resumed" and prev is not None and seg.base != prev.last:
            out.append(f"{name} connection {i + 1} resumed after {seg.base}, but had seen up to {prev.last}")
        prev = seg
    current = [seg for seg in watcher.segments if seg.epoch == watcher.epoch]
    first = current[0].base
    wrong = [(seq, got, ev.log[seq]) for seq, got in sorted(watcher.seen.items())
             if seq in ev.log and ev.log[seq] != got]
    if wrong:
        out.append(f"{name} got {len(wrong)} events that the log records as other events at the same seq, without "
                   f"a resync, e.g. seq {wrong[0][0]}: got {wrong[0][1]}, log has {wrong[0][2]}")
    gaps = [seq for seq in range(first + 1, ev.last_seq + 1) if seq not in watcher.seen]
    if gaps:
        out.append(f"{name} never got {len(gaps)} events between seq {first} (its snapshot or last resync) and "
                   f"the end of the log ({ev.last_seq}), e.g. {gaps[:5]}")
    beyond = [seq for seq in watcher.seen if seq > ev.last_seq]
    if beyond:
        out.append(f"{name} got {len(beyond)} seqs the log never reached (last_seq {ev.last_seq}), e.g. "
                   f"{sorted(beyond)[:5]}")
    return _first(out)


def check_all(ev: Evidence, inserted: Collection[str], *, limit: int, max_in_flight: int,
              allowance: int = 0, allowance_why: str = "", settled: bool = True, lost_claims_ok: bool = False,
              fates: Mapping[str, Collection[str]] | None = None,
              watchers: Sequence[FeedWatcher] = (), allow_resync: bool = False) -> list[str]:
    """Every invariant at once, each violation prefixed by the rule it breaks. ``lost_claims_ok``:
    claims may vanish from the log (a reactor that commits them asynchronously, and a database
    crash); their renders are then allowed beside the new claims of the same jobs, also in flight."""
    out = [f"jobs: {v}" for v in check_jobs(ev, inserted, settled=settled, fates=fates)]
    out += [f"renders: {v}" for v in check_renders(ev, lost_claims_ok=lost_claims_ok)]
    out += [f"leases: {v}" for v in check_leases(ev)]
    if lost_claims_ok:
        lost = sum(lost_claims(ev, job_id) for job_id in ev.requests)
        if lost:
            allowance += lost
            allowance_why = ", ".join(filter(None, [allowance_why, f"{lost} claims lost in the crash"]))
    out += [f"limit: {v}" for v in check_limit(max_in_flight, limit, allowance, allowance_why)]
    for w in watchers:
        out += [f"feed: {v}" for v in check_feed(w, ev, allow_resync=allow_resync)]
    return out


def summary(ev: Evidence) -> str:
    """One line: jobs by status, renders by outcome."""
    statuses = Counter(j["status"] for j in ev.jobs.values())
    outcomes = Counter(r["outcome"] for reqs in ev.requests.values() for r in reqs)
    return f"jobs {dict(statuses)}; renders {dict(outcomes)}; events {ev.last_seq}"


@asynccontextmanager
async def running_cluster(pg: EmbeddedPostgres, dsn: str, workdir: Path, *, reactors: int = 2,
                          **options: Any) -> AsyncIterator[Cluster]:
    """A started ``Cluster`` (the double and ``reactors`` reactors, ready); every child killed after."""
    cluster = Cluster(pg, dsn, workdir, **options)
    try:
        await cluster.start(reactors)
        yield cluster
    finally:
        await cluster.close()


def not_back_in_work(conn: Conn, ids: Collection[str], gone: Collection[str]) -> int:
    """How many of ``ids`` are neither final nor processing at a reactor other than those ``gone``."""
    n: int = conn.execute(
        "SELECT count(*) FROM reactor.jobs WHERE id = ANY(%s::uuid[]) "
        "AND status NOT IN ('completed', 'failed', 'cancelled') "
        "AND NOT (status = 'processing' AND locked_by <> ALL(%s::text[]))",
        (list(ids), list(gone))).fetchone()[0]  # type: ignore[index]
    return n


def not_restarted(conn: Conn, ids: Collection[str], since: float, gone: Collection[str] = ()) -> int:
    """How many of ``ids`` are not back in work since ``since`` (a time.time()): neither final, nor
    waiting for a retry that was decided (``run_after`` ahead), nor started (a ``started`` event) at
    or after ``since`` by a reactor other than those ``gone``."""
    n: int = conn.execute(
        "SELECT count(*) FROM reactor.jobs j WHERE j.id = ANY(%s::uuid[]) "
        "AND j.status NOT IN ('completed', 'failed', 'cancelled') "
        "AND NOT (j.status = 'queued' AND j.run_after > now()) AND NOT EXISTS ("
        "  SELECT 1 FROM reactor.events e WHERE e.job_id = j.id AND e.kind = 'started' "
        "  AND e.at >= to_timestamp(%s) AND e.actor <> ALL(%s::text[]))",
        (list(ids), since, [f"reactor:{g}" for g in gone])).fetchone()[0]  # type: ignore[index]
    return n


def held_by(conn: Conn, reactor_id: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(
        "SELECT id FROM reactor.jobs WHERE status = 'processing' AND locked_by = %s", (reactor_id,))]


def feed_clients(metrics_text: str) -> float:
    """``reactor_feed_clients`` summed over kinds, from a /metrics exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("reactor_feed_clients{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def unfinished(conn: Conn, ids: Collection[str]) -> int:
    """How many of ``ids`` are not in a final state yet."""
    n: int = conn.execute(
        "SELECT count(*) FROM reactor.jobs WHERE id = ANY(%s::uuid[]) "
        "AND status NOT IN ('completed', 'failed', 'cancelled')", (list(ids),)).fetchone()[0]  # type: ignore[index]
    return n


async def wait_finished(cluster: Cluster, conn: Conn, ids: Collection[str], timeout: float = 120.0) -> float:
    """Wait until every job of ``ids`` is final; the seconds it took."""
    return await until(lambda: unfinished(conn, ids) == 0, f"{len(ids)} jobs to finish", timeout=timeout,
                       interval=0.2, diag=lambda: f"\n{unfinished(conn, ids)} unfinished{cluster.diag()}")


async def verify(cluster: Cluster, conn: Conn, inserted: Collection[str], *, limit: int,
                 watchers: Sequence[FeedWatcher] = (), allowance: int = 0, allowance_why: str = "",
                 allow_resync: bool = False, lost_claims_ok: bool = False,
                 fates: Mapping[str, Collection[str]] | None = None, timeout: float = 120.0) -> Evidence:
    """Wait until every job is final and every watcher has caught up, then check every invariant;
    raise AssertionError listing the violations. Returns the evidence for further checks."""
    await wait_finished(cluster, conn, inserted, timeout)
    last: int = conn.execute("SELECT last_seq FROM reactor.counters").fetchone()[0]  # type: ignore[index]
    for w in watchers:
        await w.wait_for(last)
    ev = gather(conn, await cluster.double.requests())
    violations = check_all(ev, inserted, limit=limit, max_in_flight=await cluster.double.max_in_flight(),
                           allowance=allowance, allowance_why=allowance_why, fates=fates,
                           lost_claims_ok=lost_claims_ok, watchers=watchers, allow_resync=allow_resync)
    if violations:
        raise AssertionError("invariants violated:\n  " + "\n  ".join(violations) + f"\n{summary(ev)}"
                             + cluster.diag())
    return ev
