"""The LISTEN connection: one autocommit connection of its own (sharing one with queries would
serialise them on its lock), kept apart from the pool.

:class:`ListenConnection` connects, LISTENs and hands each notification's channel and payload to a
callback; a connection that says nothing for ``idle_check_s`` is probed with one cheap query, which
tells a live listener from a half-open socket (TCP keepalives catch a dead peer sooner). A lost
connection leaves as :class:`~reactor.core.errors.DatabaseUnavailable`; reconnecting is the
caller's business (reactor/engine/listener.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

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

    async def consume(self, on_notify: Callable[[str, str], None], idle_check_s: float) -> None:
        """Call ``on_notify(channel, payload)`` for each notification, until the connection is lost."""
        conn = self._conn
        with database_errors():
            while True:
                got = False
                async for n in conn.notifies(timeout=idle_check_s):
                    got = True
                    on_notify(n.channel, n.payload)
                if not got:
                    # quiet for a while: make sure the connection is really there
                    await conn.execute("SELECT 1")
