"""Real reactor processes for tests and the soak: start, signal, read the log, wait.

``ReactorProcess`` wraps one ``python -m reactor run ...`` child whose stdout and stderr go to a log
file (every assertion message carries its tail); ``reactor_process`` starts one and SIGKILLs it on
the way out. ``until`` polls a condition from async code; ``scalar`` and ``jobs_state`` read the
database for checks and for assertion messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, LiteralString

import anyio
import psycopg

__all__ = [
    "PATIENCE_S",
    "REPO",
    "Conn",
    "ReactorProcess",
    "child_env",
    "jobs_state",
    "reactor_process",
    "rss_kib",
    "scalar",
    "status_count",
    "until",
]

Conn = psycopg.Connection[Any]

REPO = Path(__file__).resolve().parents[2]
#: how long anything may take on a slow, shared machine before the test gives up
PATIENCE_S = 60.0


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child ``python -m reactor``: this checkout first on the path, unbuffered
    output, and none of the variables that would point it somewhere else."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("DATABASE_URL", "REACTOR_ORCHESTRATOR_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (from /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class ReactorProcess:
    """One ``python -m reactor run`` child; stdout and stderr go to ``log_path``."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, reactor_id: str,
                 feed_port: int | None = None) -> None:
        self.proc = proc
        self.log_path = log_path
        self.reactor_id = reactor_id
        #: the port of its feed and probes (``--listen``), if it serves them
        self.feed_port = feed_port
        self.stopped = False  # SIGSTOPped and not yet continued
        self.killed = False  # SIGKILLed on purpose (kill())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def feed_url(self) -> str:
        assert self.feed_port is not None, f"reactor {self.reactor_id} serves no feed"
        return f"ws://127.0.0.1:{self.feed_port}/feed"

    @property
    def http_base(self) -> str:
        assert self.feed_port is not None, f"reactor {self.reactor_id} serves no probes"
        return f"http://127.0.0.1:{self.feed_port}"

    def log(self, tail: int = 8000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - tail))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def diag(self) -> str:
        return (f"\n--- reactor {self.reactor_id} (pid {self.proc.pid}, exit {self.proc.poll()}) "
                f"log {self.log_path} ---\n{self.log()}")

    def send(self, sig: signal.Signals) -> None:
        assert self.proc.poll() is None, f"reactor {self.reactor_id} already exited{self.diag()}"
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """SIGKILL (also when stopped) and reap; nothing if it already exited."""
        if self.proc.poll() is None:
            self.killed = True
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.stopped = False

    def crashed(self) -> str | None:
        """Why it exited when nobody killed it (exit status and its last error line); None if it runs
        or was killed on purpose."""
        rc = self.proc.poll()
        if rc is None or self.killed:
            return None
        errors = [line.strip(" |") for line in self.log(200_000).splitlines()
                  if "Error:" in line or "Exception:" in line]
        return f"exit {rc}" + (f": {errors[-1]}" if errors else "")

    async def wait_log(self, needle: str, timeout: float = PATIENCE_S) -> None:
        """Wait until the log holds ``needle``; fail at once if the process died meanwhile."""
        deadline = time.monotonic() + timeout
        while needle not in self.log(tail=10**8):
            if self.proc.poll() is not None:
                raise AssertionError(f"reactor exited before logging {needle!r}{self.diag()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"reactor did not log {needle!r} within {timeout:g} s{self.diag()}")
            await anyio.sleep(0.05)

    async def wait_ready(self, timeout: float = PATIENCE_S) -> None:
        await self.wait_log('msg="reactor ready"', timeout)

    async def wait_exit(self, timeout: float = PATIENCE_S) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"reactor still running {timeout:g} s later{self.diag()}")
            await anyio.sleep(0.02)
        return rc


def start_reactor_process(
    dsn: str, orchestrator_url: str, log_dir: Path, reactor_id: str, *options: str,
    env: Mapping[str, str] | None = None, feed_port: int | None = None,
) -> ReactorProcess:
    """Start a reactor process (the caller kills it); ``feed_port`` adds ``--listen``."""
    log_path = log_dir / f"reactor-{reactor_id}.log"
    args = [
        sys.executable, "-m", "reactor", "--log-level", "INFO", "run", "--dsn", dsn,
        "--orchestrator-url", orchestrator_url, "--reactor-id", reactor_id, *options,
    ]
    if feed_port is not None:
        args += ["--listen", f"127.0.0.1:{feed_port}"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=child_env(env), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    return ReactorProcess(proc, log_path, reactor_id, feed_port)


@contextmanager
def reactor_process(
    dsn: str, orchestrator_url: str, log_dir: Path, reactor_id: str, *options: str,
    env: Mapping[str, str] | None = None, feed_port: int | None = None,
) -> Iterator[ReactorProcess]:
    """Start a reactor process; on the way out, SIGKILL it if it is still running."""
    rp = start_reactor_process(dsn, orchestrator_url, log_dir, reactor_id, *options, env=env, feed_port=feed_port)
    try:
        yield rp
    finally:
        rp.kill()


# -- database helpers -----------------------------------------------------------------------------


def scalar(conn: Conn, query: LiteralString, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def status_count(conn: Conn, status: str) -> int:
    n: int = scalar(conn, "SELECT count(*) FROM reactor.jobs WHERE status = %s", (status,))
    return n


async def until(check: Callable[[], bool], what: str, *, timeout: float = PATIENCE_S,
                diag: Callable[[], str] = lambda: "", interval: float = 0.05) -> float:
    """Poll ``check`` until it holds; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{diag()}")
        await anyio.sleep(interval)
    return time.monotonic() - start


def jobs_state(conn: Conn, limit: int = 200) -> str:
    """The jobs as the reactor sees them (those not final first), for assertion messages."""
    rows = conn.execute(
        "SELECT id, status, attempt, retry_count, locked_by, lease_expires_at - now(), run_after - now() "
        "FROM reactor.jobs ORDER BY status IN ('completed', 'failed', 'cancelled'), job_no LIMIT %s",
        (limit,)).fetchall()
    return "\n--- jobs (id, status, attempt, retries, locked_by, lease left, due in) ---\n" + "\n".join(
        " ".join(str(v) for v in r) for r in rows)

