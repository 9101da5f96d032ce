"""The LISTEN connection: wake-ups from NOTIFY, reconnects, and a resync after each (re)connect.

NOTIFY is a wake-up, the tables are the truth. After every (re)connect the listener LISTENs first
and only then tells its subscribers to re-read state, so nothing committed while it was away is
missed. A connection that says nothing for ``idle_check_s`` is probed with one cheap query, which
tells a live listener from a half-open socket; TCP keepalives catch a dead peer sooner.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskStatus

from reactor.core.notice import CHANNELS, Notice, parse_notice
from reactor.db.store import connect_kwargs, one_line

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
        idle_check_s: float = 60.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self._on_notice = on_notice
        self._on_connect = on_connect
        self.idle_check_s = idle_check_s
        self.max_backoff_s = max_backoff_s
        self.connected = False
        self.reconnects = 0
        self.backend_pid: int | None = None
        self._rng = random.Random()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started()`` once the first LISTEN is live."""
        started = False
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, **connect_kwargs(), application_name="reactor listener"
                )
            except psycopg.OperationalError as exc:
                failures += 1
                delay = min(self.max_backoff_s, 0.1 * 2 ** min(failures, 10)) * (0.5 + self._rng.random() / 2)
                logger.warning("listener cannot connect (retry in %.1f s): %s", delay, one_line(exc))
                await anyio.sleep(delay)
                continue
            try:
                async with conn:
                    for channel in CHANNELS:
                        await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
                    self.connected = True
                    self.backend_pid = conn.info.backend_pid
                    if started:
                        self.reconnects += 1
                        logger.info("listener reconnected (pid %s); re-reading the queue", self.backend_pid)
                    failures = 0
                    self._on_connect()
                    if not started:
                        started = True
                        task_status.started()
                    await self._consume(conn)
            except psycopg.OperationalError as exc:
                logger.warning("listener connection lost: %s", one_line(exc))
            finally:
                self.connected = False
            failures += 1
            await anyio.sleep(min(self.max_backoff_s, 0.05 * 2 ** min(failures, 10)))

    async def _consume(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            got = False
            async for n in conn.notifies(timeout=self.idle_check_s):
                got = True
                self._on_notice(parse_notice(n.channel, n.payload))
            if not got:
                # quiet for a while: make sure the connection is really there
                await conn.execute("SELECT 1")

