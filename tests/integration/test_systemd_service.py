"""A real ``python -m reactor run`` under a fake systemd: READY, WATCHDOG, STATUS and STOPPING.

The test binds the AF_UNIX datagram socket systemd would pass as $NOTIFY_SOCKET and sets
WATCHDOG_USEC=1000000 (WatchdogSec=1), so the reactor should ping about every 0.5 s.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from reactor.testing.orchestrator import OrchestratorDouble
from tests.support.reactors import wait_for
from tests.unit.test_systemd import NotifyReceiver

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
PATIENCE_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    r = NotifyReceiver(str(tmp_path / "notify"))
    try:
        yield r
    finally:
        r.close()


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def _log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-6000:]
    except OSError as exc:
        return f"(no log: {exc})"


async def test_ready_watchdog_and_stopping_of_a_real_reactor(
    dsn: str, db: psycopg.Connection[Any], receiver: NotifyReceiver, tmp_path: Path,
) -> None:
    port = free_port()
    log_path = tmp_path / "reactor.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REACTOR_ORCHESTRATOR_URL", "WATCHDOG_PID", "REACTOR_ALERT_WEBHOOK")}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "1000000",
        "REACTOR_JWT_SECRET": "a-test-secret-that-is-long-enough-for-hs256",
    })
    async with OrchestratorDouble() as orch:
        args = [sys.executable, "-m", "reactor", "run", "--journald", "--dsn", dsn,
                "--orchestrator-url", orch.url, "--reactor-id", "sd-test", "--drain-seconds", "20",
                "--listen", f"127.0.0.1:{port}"]
        proc = spawn(args, env, log_path)
        try:
            def diag() -> str:
                return f"\n--- reactor (exit {proc.poll()}) ---\n{_log(log_path)}\n--- notify ---\n{receiver.messages}"

            deadline = time.monotonic() + PATIENCE_S
            while not receiver.with_line("READY=1"):
                assert proc.poll() is None, f"the reactor exited before READY=1{diag()}"
                assert time.monotonic() < deadline, f"no READY=1 within {PATIENCE_S:g} s{diag()}"
                await anyio.sleep(0.02)
            [(ready_at, ready)] = receiver.with_line("READY=1")

            # READY means up: the feed answers, the listener is connected, the log says so
            async with httpx.AsyncClient(timeout=10) as client:
                livez = await client.get(f"http://127.0.0.1:{port}/livez")
                readyz = await client.get(f"http://127.0.0.1:{port}/readyz")
            assert livez.status_code == 200 and readyz.status_code == 200, (readyz.text, diag())
            listeners = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'reactor listener'").fetchone()
            assert listeners == (1,), diag()
            assert ready == "READY=1\nSTATUS=ready: 0 in flight, circuit closed", diag()
            assert 'msg="reactor ready"' in _log(log_path) and _log(log_path).startswith("<6>"), diag()

            # WATCHDOG=1 about every 0.5 s
            await anyio.sleep(3.0)
            window_end = time.monotonic()
            pings = [t for t in receiver.pings() if ready_at <= t <= window_end]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert 4 <= len(pings) <= 8, f"{len(pings)} pings in {window_end - ready_at:.1f} s{diag()}"
            assert 0.4 <= statistics.median(gaps) <= 0.8, f"gaps {gaps}{diag()}"

            # a render in flight shows in STATUS; SIGTERM sends STOPPING=1 and the drain lets it finish
            row = db.execute("INSERT INTO jobs (job_type, payload) VALUES ('doubt', %s) RETURNING id",
                             (json.dumps({"question": "slow one [[latency=3000]]"}),)).fetchone()
            assert row is not None
            await wait_for(dsn, "SELECT status FROM jobs WHERE id = %s", (row[0],),
                           expect=lambda s: s == "processing", timeout=PATIENCE_S)
            deadline = time.monotonic() + PATIENCE_S
            while "ready: 1 in flight, circuit closed" not in receiver.statuses():
                assert time.monotonic() < deadline, f"STATUS never showed the render{diag()}"
                await anyio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, stopping = await receiver.wait_for("STOPPING=1", timeout=PATIENCE_S)
            assert stopping == "STOPPING=1\nSTATUS=draining 1 render", diag()
            deadline = time.monotonic() + PATIENCE_S
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"the reactor did not exit after SIGTERM{diag()}"
                await anyio.sleep(0.05)
            assert proc.returncode == 0, diag()
            assert db.execute("SELECT status FROM jobs WHERE id = %s", (row[0],)).fetchone() == ("completed",)
            assert len(receiver.with_line("READY=1")) == 1 and len(receiver.with_line("STOPPING=1")) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
