"""The LISTEN connection: one autocommit connection of its own (sharing one with queries would
serialise them on its lock), kept apart from the pool.

:class:`ListenConnection` connects, LISTENs and hands each notification's channel and payload to a
callback; a connection that says nothing for ``idle_check_s`` is probed with one cheap query, which
tells a live listener from a half-open socket (TCP keepalives catch a dead peer sooner). A lost
connection leaves as :class:`~reactor.core.errors.DatabaseUnavailable`; reconnecting is the
caller's business (reactor/engine/listener.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import anyio
import psycopg
from psycopg import sql

from reactor.db.store import connect_kwargs, database_errors

__all__ = ["ListenConnection"]


class ListenConnection:
    """One connection that LISTENs (use ``async with``; :meth:`connect` makes one)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str) -> ListenConnection:
        """A fresh connection (``DatabaseUnavailable`` when the database cannot be reached)."""
        with database_errors():
            conn = await psycopg.AsyncConnection.connect(dsn, **connect_kwargs(), application_name="reactor listener")
        return cls(conn)

    async def __aenter__(self) -> ListenConnection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._conn.close()

    @property
    def backend_pid(self) -> int:
        return self._conn.info.backend_pid

    async def listen(self, channels: Sequence[str]) -> None:
        with database_errors():
            for channel in channels:
                await self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    async def unlisten(self, channels: Sequence[str]) -> None:
        with database_errors():
            for channel in channels:
                await self._conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))

    async def consume(self, on_notify: Callable[[str, str], None], idle_check_s: float,
                      wake: anyio.Event | None = None) -> None:
        """Call ``on_notify(channel, payload)`` for each notification, until the connection is lost
        (:class:`~reactor.core.errors.DatabaseUnavailable`) or ``wake`` is set (returns: the caller
        has something to do on the connection, such as LISTEN on another channel).

        The socket stays registered with the event loop, and notifications are handed on from its
        callback as they are read: per read, no task switch, no timer, no (un)registering of the
        socket. psycopg's ``notifies()`` did all three for each wait, and woke every 0.1 s while
        quiet: with several reactors, each receiving every notification of the fleet, that was most
        of what a reactor with no work to do spent.
        """
        conn = self._conn
        pgconn = conn.pgconn
        enc = conn.info.encoding
        loop = asyncio.get_running_loop()
        broken: list[BaseException] = []
        if wake is None:
            wake = anyio.Event()
        heard = False

        def read() -> None:
            nonlocal heard
            try:
                pgconn.consume_input()
                while (n := pgconn.notifies()) is not None:
                    heard = True
                    on_notify(n.relname.decode(enc), n.extra.decode(enc))
            except Exception as exc:  # the connection, or a subscriber: out of consume(), not into the loop's log
                broken.append(exc)
                loop.remove_reader(fd)
                wake.set()

        def during_query(n: psycopg.Notify) -> None:  # received while the idle check's query runs
            on_notify(n.channel, n.payload)

        with database_errors():
            async for n in conn.notifies(timeout=0):  # any that came with the LISTEN's answer
                on_notify(n.channel, n.payload)
            fd = pgconn.socket
            conn.add_notify_handler(during_query)
            try:
                while True:
                    heard = False
                    loop.add_reader(fd, read)
                    try:
                        read()  # what libpq already holds does not make the socket readable
                        with anyio.move_on_after(idle_check_s):
                            await wake.wait()
                    finally:
                        loop.remove_reader(fd)
                    if broken:
                        raise broken[0]
                    if wake.is_set():
                        return
                    if not heard:
                        # quiet for a while: make sure the connection is really there
                        await conn.execute("SELECT 1")
            finally:
                conn.remove_notify_handler(during_query)
