"""Live feed benchmark: delivery latency to many admin clients, and the reactor's memory.

    python3 bench/feed_bench.py [--clients 1000] [--rate 100] [--duration 30] [--procs 2]
                                [--client raw|websockets] [--quick]

Starts a private PostgreSQL and one reactor (``reactor run --listen``, its own process, dispatch
paused so that the only events are the inserts), connects ``--clients`` admin clients from
``--procs`` separate processes, then inserts jobs with SQL at ``--rate`` per second for
``--duration`` seconds, and prints:

* delivery latency, from the INSERT's commit (the inserting client's execute returned) to a feed
  client's receipt of that job's event, over every (event, client) pair: p50 / p99 / max
  (goal p99 <= 100 ms);
* the reactor's peak RSS (``VmHWM``) and its RSS once every client is connected (goal peak <= 200 MB);
* the reactor's CPU time during the insert phase, as a share of one core.

Clients: ``raw`` (default) is a minimal RFC 6455 client (an asyncio protocol that does the opening
handshake, answers pings, and reads unmasked frames), so that 1,000 clients on the same 2 cores as
the server and PostgreSQL cost little and the figure measures the server; ``websockets`` uses the
websockets library's client (its per-message cost on the client side then shows in the figures).
Receipt times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import functools
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "feed-bench-shared-secret-0123456789abcdef"
EVENT_PREFIX = b'{"type":"event","seq":'
GOAL_P99_MS = 100.0
GOAL_RSS_MB = 200.0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return float("nan")
    k = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return values[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def admin_token() -> str:
    import jwt

    return jwt.encode({"role": "service_role", "exp": int(time.time()) + 24 * 3600}, SECRET, algorithm="HS256")


# -- client processes ----------------------------------------------------------------------------


class RawClient(asyncio.Protocol):
    """Handshake, then frames: records the receipt time of each event by seq; answers pings."""

    def __init__(self, host: str, port: int, token: str, times: array.array[float], offset: int,
                 base: int, cap: int, ready: asyncio.Future[None]) -> None:
        self.request = (
            f"GET /feed HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.times, self.offset, self.base, self.cap = times, offset, base, cap
        self.ready = ready
        self.buf = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        transport = self.transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the snapshot"))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in buf[:end].split(b"\r\n", 1)[0]:
                self.ready.set_exception(ConnectionError(bytes(buf[:200]).decode(errors="replace")))
                return
            del buf[:end + 4]
            self.open = True
        i, n = 0, len(buf)
        while n - i >= 2:
            b0, length, hdr = buf[i], buf[i + 1] & 0x7F, 2
            if length == 126:
                if n - i < 4:
                    break
                length, hdr = int.from_bytes(buf[i + 2:i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, hdr = int.from_bytes(buf[i + 2:i + 10], "big"), 10
            if n - i < hdr + length:
                break
            opcode, start = b0 & 0x0F, i + hdr
            if opcode == 1:
                if buf.startswith(EVENT_PREFIX, start):
                    p = start + len(EVENT_PREFIX)
                    idx = int(buf[p:buf.index(b",", p)]) - self.base - 1
                    if 0 <= idx < self.cap and math.isnan(self.times[self.offset + idx]):
                        self.times[self.offset + idx] = now
                elif not self.ready.done() and buf.startswith(b'{"type":"snapshot"', start):
                    self.ready.set_result(None)
            elif opcode == 9:
                self._pong(bytes(buf[start:start + length]))
            elif opcode == 8:
                self.closed = True
            i = start + length
        del buf[:i]

    def _pong(self, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[k % 4] for k, b in enumerate(payload))
        assert self.transport is not None and len(payload) < 126
        self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)


async def websockets_client(url: str, token: str, times: array.array[float], offset: int, base: int, cap: int,
                            ready: asyncio.Future[None], stop: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None) as ws:
        await ws.recv()
        ready.set_result(None)
        async for message in ws:
            now = time.monotonic()
            data = message.encode() if isinstance(message, str) else message
            if data.startswith(EVENT_PREFIX):
                p = len(EVENT_PREFIX)
                idx = int(data[p:data.index(b",", p)]) - base - 1
                if 0 <= idx < cap and math.isnan(times[offset + idx]):
                    times[offset + idx] = now
            if stop.is_set():
                return


async def client_process(args: argparse.Namespace) -> None:
    """One process of clients: connect, say READY, record until STOP on stdin, write the times."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    host, port = args.host, args.port
    cap, count = args.cap, args.count
    times = array.array("d", [math.nan]) * (count * cap)
    readies: list[asyncio.Future[None]] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    for batch in range(0, count, 50):  # a few at a time: the server's listen backlog is finite
        futs = []
        for k in range(batch, min(count, batch + 50)):
            ready: asyncio.Future[None] = loop.create_future()
            readies.append(ready)
            futs.append(ready)
            if args.kind == "raw":
                await loop.create_connection(
                    functools.partial(RawClient, host, port, args.token, times, k * cap, args.base, cap, ready),
                    host, port)
            else:
                tasks.append(asyncio.create_task(websockets_client(
                    f"ws://{host}:{port}/feed", args.token, times, k * cap, args.base, cap, ready, stop)))
        await asyncio.wait_for(asyncio.gather(*futs), timeout=60)
    print(f"READY {len(readies)}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    stop.set()
    await loop.run_in_executor(None, Path(args.out).write_bytes, times.tobytes())
    print("DONE", flush=True)
    os._exit(0)  # do not wait for a thousand orderly closes


# -- the run -------------------------------------------------------------------------------------


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the reactor did not get ready: {url}")
        time.sleep(0.1)


def run(args: argparse.Namespace) -> int:
    import psycopg

    from reactor.db.embedded import EmbeddedPostgres
    from reactor.db.migrations import migrate_up

    nofile = raise_fd_limit()
    if nofile < args.clients + 200:
        print(f"warning: open files limited to {nofile}; {args.clients} clients need more")
    workdir = Path(tempfile.mkdtemp(prefix="feed-bench-"))
    pg = EmbeddedPostgres()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dsn = pg.start()
        migrate_up(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE job_queue_config SET max_concurrent_renders = 0")  # events: inserts only
            base = int(conn.execute("SELECT last_seq FROM reactor.counters").fetchone()[0])  # type: ignore[index]
        port = free_port()
        env = {**os.environ, "REACTOR_JWT_SECRET": SECRET}
        reactor_log = open(workdir / "reactor.log", "wb")  # noqa: SIM115
        reactor = subprocess.Popen(
            [sys.executable, "-m", "reactor", "--log-level", "WARNING", "run", "--dsn", dsn,
             "--orchestrator-url", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}",
             "--max-clients", str(args.clients + 100)],
            cwd=ROOT, env=env, stdout=reactor_log, stderr=subprocess.STDOUT,
        )
        procs.append(reactor)
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        rss_idle = rss_kb(reactor.pid, "VmRSS")

        n_events = int(args.rate * args.duration)
        cap = n_events + 100
        token = admin_token()
        per = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
        t0 = time.monotonic()
        clients: list[tuple[subprocess.Popen[bytes], Path, int]] = []
        for i, count in enumerate(per):
            out = workdir / f"times-{i}.bin"
            p = subprocess.Popen(
                [sys.executable, __file__, "--client-proc", "--host", "127.0.0.1", "--port", str(port),
                 "--count", str(count), "--token", token, "--base", str(base), "--cap", str(cap),
                 "--out", str(out), "--client", args.client],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            procs.append(p)
            clients.append((p, out, count))
        for p, _, count in clients:
            assert p.stdout is not None
            line = p.stdout.readline().decode().strip()
            if line != f"READY {count}":
                raise SystemExit(f"a client process failed to connect its clients: {line!r}")
        connect_s = time.monotonic() - t0
        time.sleep(1.0)
        rss_connected = rss_kb(reactor.pid, "VmRSS")

        # inserts at a steady rate; each one's commit time, by seq (nothing else writes events)
        rss_samples: list[int] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.25):
                rss_samples.append(rss_kb(reactor.pid, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        commits = array.array("d", [math.nan]) * cap
        cpu0 = cpu_seconds(reactor.pid)
        clients_cpu0 = sum(cpu_seconds(p.pid) for p, _, _ in clients)
        with psycopg.connect(dsn, autocommit=True) as conn:
            start = time.monotonic() + 0.2
            for i in range(n_events):
                due = start + i / args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                conn.execute("INSERT INTO jobs (job_type, payload) VALUES ('topic_short', '{\"topic\": \"bench\"}')")
                commits[i] = time.monotonic()
            insert_s = time.monotonic() - start
            last = int(conn.execute("SELECT last_seq FROM reactor.counters").fetchone()[0])  # type: ignore[index]
        cpu1 = cpu_seconds(reactor.pid)
        clients_cpu1 = sum(cpu_seconds(p.pid) for p, _, _ in clients)
        load = os.getloadavg()[0]
        if last != base + n_events:
            raise SystemExit(f"expected seq {base + n_events}, got {last}: something else wrote events")
        time.sleep(3.0)  # the stragglers
        stop_sampling.set()
        peak_rss = rss_kb(reactor.pid, "VmHWM")
        for p, _, _ in clients:
            assert p.stdin is not None
            p.stdin.write(b"STOP\n")
            p.stdin.flush()
        for p, _, _ in clients:
            assert p.stdout is not None
            p.stdout.readline()
            p.wait(timeout=60)

        latencies: list[float] = []
        first = [math.inf] * n_events  # per event: its first receipt by any client
        missing = 0
        for _, out, count in clients:
            times = array.array("d")
            times.frombytes(out.read_bytes())
            for k in range(count):
                row = k * cap
                for i in range(n_events):
                    t = times[row + i]
                    if math.isnan(t):
                        missing += 1
                    else:
                        ms = (t - commits[i]) * 1000
                        latencies.append(ms)
                        if ms < first[i]:
                            first[i] = ms
        latencies.sort()
        first.sort()
        p50, p99, worst = pct(latencies, 50), pct(latencies, 99), latencies[-1] if latencies else float("nan")
        ok_latency = p99 <= GOAL_P99_MS and missing == 0
        ok_rss = peak_rss / 1024 <= GOAL_RSS_MB

        print(f"feed benchmark: {args.clients} admin clients ({args.procs} processes, {args.client} clients), "
              f"{args.rate:g} events/s for {args.duration:g} s")
        print(f"  connect:   {args.clients} clients with their snapshots in {connect_s:.1f} s")
        print(f"  events:    {n_events} inserted in {insert_s:.1f} s; deliveries "
              f"{len(latencies):,} of {n_events * args.clients:,} ({missing} missing)")
        print(f"  latency:   commit -> receipt p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms  "
              f"(goal p99 <= {GOAL_P99_MS:g} ms)  {'PASS' if ok_latency else 'FAIL'}")
        print(f"             first client to receive each event: p50 {pct(first, 50):.1f} ms, "
              f"p99 {pct(first, 99):.1f} ms (the NOTIFY -> read -> write path, before the fan-out)")
        print(f"  memory:    reactor RSS {rss_idle / 1024:.0f} MB idle, {rss_connected / 1024:.0f} MB with clients, "
              f"{max(rss_samples, default=0) / 1024:.0f} MB max sampled, peak (VmHWM) {peak_rss / 1024:.0f} MB  "
              f"(goal <= {GOAL_RSS_MB:g} MB)  {'PASS' if ok_rss else 'FAIL'}")
        print(f"  cpu:       while inserting: reactor {100 * (cpu1 - cpu0) / insert_s:.0f}% of one core, client "
              f"processes {100 * (clients_cpu1 - clients_cpu0) / insert_s:.0f}% together; "
              f"load average {load:.1f} on {os.cpu_count()} cores")
        return 0 if ok_latency and ok_rss else 1
    finally:
        if procs and procs[0].poll() is not None:  # the reactor died: say why
            print((workdir / "reactor.log").read_text(errors="replace")[-3000:])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="job events per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of inserts")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--client", choices=["raw", "websockets"], default="raw")
    parser.add_argument("--quick", action="store_true", help="200 clients, 10 s")
    # the client processes' own arguments
    parser.add_argument("--client-proc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_proc:
        args.kind = args.client
        try:
            import uvloop  # the reactor uses it too when installed
        except ImportError:
            asyncio.run(client_process(args))
        else:
            uvloop.run(client_process(args))
        return 0
    if args.quick:
        args.clients, args.duration = 200, 10.0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
