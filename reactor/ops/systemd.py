"""systemd integration: the sd_notify protocol in a few lines (no C extension, no dependency).

With ``Type=notify`` (deploy/reactor.service) systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram
socket (a leading ``@`` means the abstract namespace), and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``
(and maybe ``$WATCHDOG_PID``, the process the watchdog is meant for). The reactor sends:

* ``READY=1`` once the database pool, the dispatcher, the LISTEN connection and (with ``--listen``)
  the feed are up: the feed's port is checked to answer first;
* ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` from a task of the event loop, while the LISTEN
  connection is up or has been down for less than ``listener_grace_s`` (120 s), and so is every
  required part of the service (reactor/engine/supervise.py restarts a failed one). A wedged event loop
  sends nothing by construction, and a listener or a part that cannot come back stops the pings too:
  systemd kills the reactor (SIGABRT) and ``Restart=on-failure`` starts a fresh one;
* ``STOPPING=1`` when SIGTERM starts the drain;
* ``STATUS=...``: one line for ``systemctl status`` ("ready: 3 in flight, circuit closed",
  "draining 2 renders"), sent again whenever it changes (checked at each watchdog tick).

Everything is a no-op when ``$NOTIFY_SOCKET`` is unset (a terminal, a container, the tests).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from reactor.core.environment import Environment

__all__ = ["Notifier", "Supervisor", "SystemdSettings", "describe"]

logger = logging.getLogger(__name__)

#: how often STATUS is refreshed when there is no watchdog to piggyback on
_STATUS_EVERY_S = 5.0


@dataclass(frozen=True)
class SystemdSettings:
    """What systemd passed this process: ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``
    (None: not run by systemd; everything is then a no-op)."""

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    watchdog_pid: int | None = None

    @classmethod
    def from_environment(cls, env: Environment) -> SystemdSettings:
        return cls(env.notify_socket, _int(env.watchdog_usec), _int(env.watchdog_pid))


class Notifier:
    """Sends sd_notify datagrams to ``address``; every call is a no-op when it is None."""

    def __init__(
        self, address: str | None, *, watchdog_usec: int | None = None, watchdog_pid: int | None = None,
    ) -> None:
        self.address = address or None
        if self.address is not None and not self.address.startswith(("/", "@")):
            logger.warning("ignoring NOTIFY_SOCKET=%s: not a path or an abstract socket name", self.address)
            self.address = None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self.watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._failures = 0

    @classmethod
    def from_settings(cls, settings: SystemdSettings) -> Notifier:
        return cls(settings.notify_socket, watchdog_usec=settings.watchdog_usec,
                   watchdog_pid=settings.watchdog_pid)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Notifier:
        """The notifier systemd set up for a process with this environment."""
        return cls.from_settings(SystemdSettings.from_environment(Environment.read(env)))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``); None: no watchdog for us."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None  # the watchdog is meant for another process (e.g. our parent)
        return self.watchdog_usec / 2_000_000

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; False when nothing was sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(_one_line(a) for a in assignments).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full receiver drops the datagram, never blocks the loop
            self._sock.sendto(data, target)
        except OSError as exc:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 1000 == 0:
                logger.warning("cannot notify systemd at %s (%d failures): %s", self.address, self._failures, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def describe(*, stopping: bool, inflight: int, circuit: str, firing: Sequence[str] = ()) -> str:
    """The STATUS line: ``ready: 3 in flight, circuit closed`` or ``draining 2 renders``."""
    if stopping:
        text = f"draining {inflight} render{'' if inflight == 1 else 's'}"
    else:
        text = f"ready: {inflight} in flight, circuit {circuit.replace('_', '-')}"
    if firing:
        text += f"; alerts firing: {', '.join(firing)}"
    return text


class Supervisor:
    """READY, the watchdog and STATUS for the service (run ``run`` in its task group)."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        status: Callable[[], str],
        listener_connected: Callable[[], bool] = lambda: True,
        parts_down: Callable[[], Sequence[str]] = lambda: (),
        feed_address: Callable[[], tuple[str, int] | None] = lambda: None,
        listener_grace_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.status = status
        self.listener_connected = listener_connected
        #: the required parts of the service that are not running (being restarted)
        self.parts_down = parts_down
        self.feed_address = feed_address
        self.listener_grace_s = listener_grace_s
        self.clock = clock
        self.pings = 0
        self._down_since: float | None = None
        self._parts_down_since: float | None = None
        self._parts_down: Sequence[str] = ()
        self._last_status: str | None = None
        self._silenced = False

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def healthy(self) -> bool:
        """True unless the LISTEN connection, or a required part, has been down for longer than the grace."""
        now = self.clock()
        if self.listener_connected():
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        self._parts_down = self.parts_down()
        if not self._parts_down:
            self._parts_down_since = None
        elif self._parts_down_since is None:
            self._parts_down_since = now
        return all(since is None or now - since < self.listener_grace_s
                   for since in (self._down_since, self._parts_down_since))

    def _status_line(self, healthy: bool) -> str:
        text = self.status()
        stopped = "" if healthy else " (watchdog pings stopped)"
        if self._parts_down_since is not None:
            down = self.clock() - self._parts_down_since
            text = f"{', '.join(self._parts_down)} down for {down:.0f} s{stopped}; {text}"
        if self._down_since is not None:
            down = self.clock() - self._down_since
            text = f"listener disconnected for {down:.0f} s{stopped}; {text}"
        return text

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send READY=1 (once the feed's port answers), then WATCHDOG=1 and STATUS until cancelled."""
        if not self.enabled:
            task_status.started()
            return
        await self._wait_for_feed()
        self._last_status = self._status_line(self.healthy())
        self.notifier.send("READY=1", f"STATUS={self._last_status}")
        logger.info("told systemd we are ready", extra={"watchdog_s": self.notifier.watchdog_interval})
        task_status.started()
        interval = self.notifier.watchdog_interval
        every = interval if interval is not None else _STATUS_EVERY_S
        next_at = self.clock() + every
        while True:
            await anyio.sleep(max(0.0, next_at - self.clock()))
            # a loop that was blocked past the tick pings once, late, and keeps its cadence from now
            next_at = max(next_at + every, self.clock() + every / 2)
            self.tick(watchdog=interval is not None)

    def tick(self, *, watchdog: bool = True) -> None:
        """One beat: WATCHDOG=1 if healthy, and STATUS if it changed."""
        healthy = self.healthy()
        lines: list[str] = []
        if watchdog and healthy:
            lines.append("WATCHDOG=1")
            self.pings += 1
        status = self._status_line(healthy)
        if status != self._last_status:
            lines.append(f"STATUS={status}")
            self._last_status = status
        if watchdog and not healthy and not self._silenced:
            self._silenced = True  # log it once per outage
            what = "listener" if self._down_since is not None else ", ".join(self._parts_down)
            logger.error("%s down for more than %.0f s: no more watchdog pings (systemd will restart us)",
                         what, self.listener_grace_s)
        elif healthy:
            self._silenced = False
        self.notifier.send(*lines)

    def stopping(self, status: str) -> None:
        """SIGTERM: the drain begins."""
        self._last_status = status
        self.notifier.send("STOPPING=1", f"STATUS={status}")

    async def _wait_for_feed(self) -> None:
        """With ``--listen``, READY only once a TCP connection to the feed's port succeeds."""
        address = self.feed_address()
        if address is None:
            return
        host, port = address
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        started = self.clock()
        warned = started
        while True:
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError as exc:
                if self.clock() - warned > 10:
                    warned = self.clock()
                    logger.warning("feed port %s:%d does not answer yet: %s", host, port, exc)
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))
