"""One signed-in feed client: what its session and the fan-out both need to know of it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from uuid import UUID

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.protocol import Protocol

from reactor.web.auth import Principal
from reactor.web.gate import TokenBucket
from reactor.web.wire import Entry

__all__ = ["Client"]


@dataclass(eq=False)
class Client:
    ws: ServerConnection
    principal: Principal
    #: its messages' budget (dashboard requests, fresh tokens)
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(20.0, 40.0))
    #: the last seq this client was sent or skipped (not its to see)
    cursor: int = 0
    #: events up to here may be read from the database (catching up after a (re)connect)
    catchup_until: int = 0
    #: True: its own task sends (catching up, or its output is backed up); False: the pump writes
    lagging: bool = True
    wake: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    close_code: int | None = None
    close_reason: str = ""
    close_metric: str = ""
    closed: bool = False
    resync: str | None = None
    pending_stats: bytes | None = None
    pending_positions: dict[UUID, int] = field(default_factory=dict)
    pending_heartbeat: bool = False
    #: a user's queued jobs and the position last sent for each
    queued: dict[UUID, int | None] = field(default_factory=dict)
    # read once per client per round by the pump: kept at hand (an identity never changes)
    is_admin: bool = field(init=False)
    transport: asyncio.Transport = field(init=False)
    protocol: Protocol = field(init=False)

    def __post_init__(self) -> None:
        self.is_admin = self.principal.admin
        self.transport = self.ws.transport
        self.protocol = self.ws.protocol

    @property
    def admin(self) -> bool:
        return self.principal.admin

    @property
    def user_id(self) -> UUID | None:
        return self.principal.user_id

    def payload(self, entry: Entry) -> bytes | None:
        if self.principal.admin:
            return entry.admin
        return entry.user if entry.user_id is not None and entry.user_id == self.principal.user_id else None

    def close(self, code: int | None, reason: str = "", metric: str = "") -> None:
        """End the session; with a code, the handler closes the websocket with it."""
        if not self.closed:
            self.closed = True
            self.close_code, self.close_reason, self.close_metric = code, reason, metric
            if self.scope is not None:
                self.scope.cancel()

    def poke(self) -> None:
        self.wake.set()
