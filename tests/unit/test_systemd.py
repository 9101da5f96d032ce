"""sd_notify without systemd: a datagram socket bound by the test stands in for $NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from reactor.ops.systemd import Notifier, Supervisor, describe

pytestmark = pytest.mark.anyio


class NotifyReceiver:
    """An AF_UNIX datagram socket (a path, or ``@name`` in the abstract namespace) read by a thread,
    which stamps each message with time.monotonic() on arrival (so it sees what a blocked event loop
    of the same process sends, or does not)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-receiver", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def with_line(self, line: str) -> list[tuple[float, str]]:
        """Messages holding ``line`` (one of its newline-separated assignments)."""
        return [(t, m) for t, m in list(self.messages) if line in m.split("\n")]

    def pings(self) -> list[float]:
        return [t for t, _ in self.with_line("WATCHDOG=1")]

    def statuses(self) -> list[str]:
        return [a[len("STATUS="):] for _, m in list(self.messages) for a in m.split("\n") if a.startswith("STATUS=")]

    async def wait_for(self, line: str, timeout: float = 30.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while not (found := self.with_line(line)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line!r} within {timeout:g} s; got {self.messages!r}")
            await anyio.sleep(0.02)
        return found[0]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    r = NotifyReceiver(str(tmp_path / "notify"))
    try:
        yield r
    finally:
        r.close()


def test_no_socket_means_no_op() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.send("READY=1") is False
    assert Notifier("relative/path").enabled is False  # neither a path nor @abstract: ignored


def test_watchdog_interval_is_half_of_watchdog_usec_and_honours_watchdog_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env).watchdog_interval == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


async def test_one_datagram_to_a_path_and_to_an_abstract_socket(receiver: NotifyReceiver) -> None:
    n = Notifier(receiver.address)
    assert n.send("READY=1", "STATUS=ready: 0 in flight,\ncircuit closed")
    _, message = await receiver.wait_for("READY=1")
    assert message == "READY=1\nSTATUS=ready: 0 in flight, circuit closed"  # a value never spans lines
    n.close()

    abstract = NotifyReceiver(f"@reactor-test-{secrets.token_hex(4)}")
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": abstract.address})
        assert n.send("STOPPING=1")
        await abstract.wait_for("STOPPING=1")
        n.close()
    finally:
        abstract.close()


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.send("READY=1") is False
    n.close()


def test_status_lines() -> None:
    assert describe(stopping=False, inflight=3, circuit="closed") == "ready: 3 in flight, circuit closed"
    assert describe(stopping=False, inflight=0, circuit="half_open") == "ready: 0 in flight, circuit half-open"
    assert describe(stopping=True, inflight=2, circuit="open") == "draining 2 renders"
    assert describe(stopping=True, inflight=1, circuit="open", firing=("queue_depth",)) == (
        "draining 1 render; alerts firing: queue_depth")


async def test_ready_then_pings_at_half_the_watchdog_and_none_while_the_loop_is_blocked(
    receiver: NotifyReceiver,
) -> None:
    """WATCHDOG_USEC=1000000: a ping about every 0.5 s; a loop blocked for 2 s sends none meanwhile."""
    sup = Supervisor(Notifier(receiver.address, watchdog_usec=1_000_000),
                     status=lambda: describe(stopping=False, inflight=0, circuit="closed"))
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        ready_at, ready = await receiver.wait_for("READY=1")
        assert ready == "READY=1\nSTATUS=ready: 0 in flight, circuit closed"
        await anyio.sleep(2.2)

        blocked: list[float] = []

        async def block() -> None:
            blocked.append(time.monotonic())
            time.sleep(2.0)  # noqa: ASYNC251  (the point: a wedged event loop)
            blocked.append(time.monotonic())

        tg.start_soon(block)
        while len(blocked) < 2:
            await anyio.sleep(0.01)
        await anyio.sleep(1.8)
        tg.cancel_scope.cancel()

    start, end = blocked
    pings = receiver.pings()
    before = [t for t in pings if ready_at < t <= start]
    during = [t for t in pings if start + 0.1 < t < end - 0.05]
    after = [t for t in pings if t >= end - 0.05]
    assert during == [], f"pings while the loop was blocked: {during} (block {start:.2f}-{end:.2f})"
    gaps = [b - a for a, b in itertools.pairwise(before)]
    assert 2 <= len(before) <= 6, before
    assert 0.4 <= statistics.median(gaps) <= 0.8 and max(gaps) <= 1.5, gaps
    assert len(after) >= 2, f"pings did not resume after the block: {after}"


async def test_pings_stop_when_the_listener_stays_down_past_the_grace(receiver: NotifyReceiver) -> None:
    connected = True
    sup = Supervisor(Notifier(receiver.address, watchdog_usec=200_000), status=lambda: "ready",
                     listener_connected=lambda: connected, listener_grace_s=0.6)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await anyio.sleep(0.5)
        connected = False
        down_at = time.monotonic()
        await anyio.sleep(2.0)
        connected = True
        up_at = time.monotonic()
        await anyio.sleep(0.8)
        tg.cancel_scope.cancel()
    pings = receiver.pings()
    assert any(down_at < t < down_at + 0.5 for t in pings), "pings stopped before the grace was over"
    silent = [t for t in pings if down_at + 0.9 < t < up_at]
    assert silent == [], f"pings with the listener down past the grace: {silent}"
    assert any(t > up_at for t in pings), "pings did not resume after the listener came back"
    statuses = receiver.statuses()
    assert any("listener disconnected" in s and "watchdog pings stopped" in s for s in statuses), statuses
    assert statuses[-1] == "ready", statuses


async def test_ready_waits_until_the_feed_port_answers(receiver: NotifyReceiver) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there yet
    sup = Supervisor(Notifier(receiver.address), status=lambda: "ready",
                     feed_address=lambda: ("0.0.0.0", port))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        await anyio.sleep(0.6)
        assert receiver.with_line("READY=1") == []
        listening_at = time.monotonic()
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        ready_at, _ = await receiver.wait_for("READY=1", timeout=10)
        assert ready_at >= listening_at
        await listener.aclose()
        tg.cancel_scope.cancel()


async def test_stopping(receiver: NotifyReceiver) -> None:
    sup = Supervisor(Notifier(receiver.address), status=lambda: "ready")
    sup.stopping("draining 2 renders")
    _, message = await receiver.wait_for("STOPPING=1")
    assert message == "STOPPING=1\nSTATUS=draining 2 renders"
    disabled = Supervisor(Notifier(None), status=lambda: "ready")
    with anyio.fail_after(1):
        await disabled.run()  # returns at once: nothing to supervise
    disabled.stopping("draining 0 renders")


def test_a_required_part_down_past_the_grace_stops_the_pings() -> None:
    now = 0.0
    down: list[str] = []
    sup = Supervisor(Notifier(None), status=lambda: "ready", parts_down=lambda: down, listener_grace_s=120.0,
                     clock=lambda: now)
    assert sup.healthy()
    down = ["feed"]
    assert sup.healthy()  # down from now on
    now = 119.0
    assert sup.healthy() and sup._status_line(True) == "feed down for 119 s; ready"
    now = 120.5
    assert not sup.healthy()
    assert sup._status_line(False) == "feed down for 120 s (watchdog pings stopped); ready"
    down = []
    assert sup.healthy() and sup._status_line(True) == "ready"
    down = ["sweeper"]
    now = 200.0
    assert sup.healthy()  # a new outage: a new grace
