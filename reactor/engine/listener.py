"""The listener: wake-ups from NOTIFY, reconnects, and a resync after each (re)connect.

NOTIFY is a wake-up, the tables are the truth. After every (re)connect the listener LISTENs first
and only then tells its subscribers to re-read state, so nothing committed while it was away is
missed. The connection itself (and its idle check) is reactor/db/listen.py; each payload is read
once into a :class:`~reactor.core.notice.Notice`.

It LISTENs on :data:`~reactor.core.notice.CHANNELS` always, and on ``reactor_log`` (a reactor's
cycles that give nobody else work, migration 0017) only while :meth:`Listener.follow_log` asks for
it: the feed does while it has clients. Once that LISTEN is live, ``on_log`` is called, so that
what was committed before it is read from the table.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from reactor.core.backoff import backoff
from reactor.core.errors import DatabaseUnavailable
from reactor.core.notice import CHANNELS, LOG_CHANNEL, Notice, parse_notice
from reactor.db.listen import ListenConnection
from reactor.db.store import one_line

__all__ = ["Listener"]

logger = logging.getLogger(__name__)


class Listener:
    """Owns one autocommit connection that LISTENs on :data:`CHANNELS`.

    ``on_notice`` is called for each notification, ``on_connect`` after every successful LISTEN
    (first connect and each reconnect). Both are plain callables and must not block.
    """

    def __init__(
        self,
        dsn: str,
        *,
        on_notice: Callable[[Notice], None],
        on_connect: Callable[[], None],
        on_log: Callable[[], None] = lambda: None,
        idle_check_s: float = 60.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self._on_notice = on_notice
        self._on_connect = on_connect
        self._on_log = on_log
        self._want_log = False  # LISTEN on reactor_log (follow_log)
        self.following_log = False  # that LISTEN is live
        self._changed = anyio.Event()  # follow_log changed: interrupts consume()
        self.idle_check_s = idle_check_s
        self.max_backoff_s = max_backoff_s
        self.connected = False
        self.reconnects = 0
        self.backend_pid: int | None = None
        self._rng = random.Random()

    def follow_log(self, on: bool) -> None:
        """LISTEN on ``reactor_log`` too (``on``), or no longer; applied at once, and after every reconnect."""
        if on != self._want_log:
            self._want_log = on
            self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started()`` once the first LISTEN is live."""
        started = False
        failures = 0
        while True:
            try:
                conn = await ListenConnection.connect(self.dsn)
            except DatabaseUnavailable as exc:
                failures += 1
                delay = backoff(failures, base=0.1, cap=self.max_backoff_s, rng=self._rng)
                logger.warning("listener cannot connect (retry in %.1f s): %s", delay, one_line(exc))
                await anyio.sleep(delay)
                continue
            try:
                async with conn:
                    await conn.listen(CHANNELS)
                    self.connected = True
                    self.backend_pid = conn.backend_pid
                    if started:
                        self.reconnects += 1
                        logger.info("listener reconnected (pid %s); re-reading the queue", self.backend_pid)
                    failures = 0
                    self._on_connect()
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        self._changed = anyio.Event()
                        await self._apply_follow(conn)
                        await conn.consume(self._notify, self.idle_check_s, self._changed)
            except DatabaseUnavailable as exc:
                logger.warning("listener connection lost: %s", one_line(exc))
            finally:
                self.connected = False
                self.following_log = False
            failures += 1
            await anyio.sleep(backoff(failures, base=0.05, cap=self.max_backoff_s, rng=self._rng))

    async def _apply_follow(self, conn: ListenConnection) -> None:
        want = self._want_log
        if want == self.following_log:
            return
        if want:
            await conn.listen([LOG_CHANNEL])
            self.following_log = True
            self._on_log()  # what was committed before the LISTEN: read it from the table
        else:
            await conn.unlisten([LOG_CHANNEL])
            self.following_log = False

    def _notify(self, channel: str, payload: str) -> None:
        self._on_notice(parse_notice(channel, payload))
