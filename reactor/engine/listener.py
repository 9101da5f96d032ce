"""The LISTEN connection: wake-ups from NOTIFY, reconnects, and a resync after each (re)connect.

NOTIFY is a wake-up, the tables are the truth. After every (re)connect the listener LISTENs first
and only then tells its subscribers to re-read state, so nothing committed while it was away is
missed. A connection that says nothing for ``idle_check_s`` is probed with one cheap query, which
tells a live listener from a half-open socket; TCP keepalives catch a dead peer sooner.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio
import psycopg
from anyio.abc import TaskStatus

from reactor.core.models import parse_uuid
from reactor.core.policy import nested_deeper_than
from reactor.db.store import connect_kwargs, one_line

__all__ = ["CHANNELS", "Listener", "Notice", "parse_notice"]

logger = logging.getLogger(__name__)

#: job events and config changes (dispatch and feed), alert transitions and circuit states (feed)
CHANNELS = ("reactor_events", "reactor_config", "reactor_alerts", "reactor_fleet")


#: deeper payloads are ignored: the reactor's own are 1 deep, and anyone may NOTIFY these channels
_MAX_NOTICE_DEPTH = 4


@dataclass(frozen=True)
class Notice:
    """One notification, read once into typed fields (NOTIFY is a wake-up: the tables are the truth).

    Anyone who can connect may NOTIFY our channels, so every field is checked: one of the wrong
    type reads as absent. ``payload`` is the decoded JSON object (``{}`` when it was not one), for
    the feed's alert and circuit messages.
    """

    channel: str
    payload: dict[str, Any] = field(default_factory=dict)
    #: reactor_events: the event's seq (the last one's, for several) and how many it covers
    seq: int | None = None
    n: int = 0
    #: one event: its kind, job, status before and after
    kind: str | None = None
    job_id: UUID | None = None
    status: str | None = None
    old_status: str | None = None
    #: several events: how many became queued, left processing, were cancelled
    queued: int = 0
    finished: int = 0
    cancelled: int = 0
    actor: str | None = None
    truncated: bool = False


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= 256 else None


def parse_notice(channel: str, text: str) -> Notice:
    """A notification's payload as a :class:`Notice`; never raises, whatever ``text`` holds."""
    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        _ignored(channel, "not JSON", text)
        return Notice(channel)
    if not isinstance(value, dict):
        _ignored(channel, "not a JSON object", text)
        return Notice(channel)
    if nested_deeper_than(value, _MAX_NOTICE_DEPTH):
        _ignored(channel, "nested too deep", text)
        return Notice(channel)
    seq = value.get("seq")
    return Notice(
        channel, value,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None,
        n=_count(value.get("n")), kind=_text(value.get("kind")), job_id=parse_uuid(value.get("id")),
        status=_text(value.get("status")), old_status=_text(value.get("old_status")),
        queued=_count(value.get("q")), finished=_count(value.get("f")), cancelled=_count(value.get("c")),
        actor=_text(value.get("actor")), truncated=value.get("truncated") is True,
    )


_last_ignored = 0.0
_ignored_since = 0


def _ignored(channel: str, why: str, text: str) -> None:
    """One warning a minute at most: anyone may flood a channel."""
    global _last_ignored, _ignored_since
    _ignored_since += 1
    now = time.monotonic()
    if now - _last_ignored >= 60.0:
        logger.warning("ignoring a notification on %s (%s; %d ignored since the last warning): %.200r",
                       channel, why, _ignored_since, text)
        _last_ignored, _ignored_since = now, 0


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

