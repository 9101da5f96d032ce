"""Who holds the feed's connections, and how much each signed-in client may send: bookkeeping only.

:class:`Gate` counts connections from their TCP accept: unauthenticated ones (at most
``max_unauthenticated``; one more pushes out the oldest) and authenticated ones (at most
``max_clients``, never pushed out). :class:`Connection` is the websockets connection that tells the
gate when it opens and closes; :class:`TokenBucket` is a client's request budget.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

__all__ = ["Connection", "Gate", "TokenBucket", "connection_class"]

K = TypeVar("K")


class Gate(Generic[K]):
    """Who holds the feed's connections: bookkeeping only, no I/O (the feed acts on its answers).

    Every connection starts unauthenticated, from its TCP accept (plain HTTP requests too) until a
    token is accepted, and at most ``max_unauthenticated`` are: one more pushes out the oldest, which
    has had the longest to sign in (a browser sends its token within milliseconds of connecting; an
    idle socket never does). Authenticated connections are at most ``max_clients``; nothing unsigned
    can take their places, and they are never pushed out.
    """

    def __init__(self, max_clients: int, max_unauthenticated: int) -> None:
        self.max_clients = max_clients
        self.max_unauthenticated = max(1, max_unauthenticated)
        self._waiting: dict[K, None] = {}  # in the order they connected
        self._authenticated: set[K] = set()

    @property
    def unauthenticated(self) -> int:
        return len(self._waiting)

    @property
    def authenticated(self) -> int:
        return len(self._authenticated)

    @property
    def full(self) -> bool:
        """No room for another authenticated connection."""
        return len(self._authenticated) >= self.max_clients

    def opened(self, conn: K) -> K | None:
        """A new connection (unauthenticated); returns the one it pushes out, if any."""
        victim: K | None = None
        if len(self._waiting) >= self.max_unauthenticated:
            victim = next(iter(self._waiting))
            del self._waiting[victim]
        self._waiting[conn] = None
        return victim

    def authenticate(self, conn: K) -> bool:
        """A token was accepted: True if the connection may stay; False if ``max_clients`` are
        connected, or if it is no longer known (pushed out, or closed meanwhile)."""
        if conn in self._authenticated:
            return True
        if self.full or conn not in self._waiting:
            return False
        del self._waiting[conn]
        self._authenticated.add(conn)
        return True

    def closed(self, conn: K) -> None:
        self._waiting.pop(conn, None)
        self._authenticated.discard(conn)


class TokenBucket:
    """A client's request budget: ``rate`` a second on average, ``burst`` at once (``now`` is passed in)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._stamp: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Connection(ServerConnection):
    """A feed connection, known to the feed's :class:`Gate` from its first byte to its last."""

    gate: Gate[Connection]  # set on the subclass each Feed makes (see connection_class)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: pushed out by newer unauthenticated connections
        self.evicted = False
        #: set while the handler waits for the first message (an eviction cancels it)
        self.auth_scope: anyio.CancelScope | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        victim = self.gate.opened(self)
        if victim is not None:
            victim.evict()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.closed(self)
        super().connection_lost(exc)

    def evict(self) -> None:
        self.evicted = True
        if self.auth_scope is not None:
            self.auth_scope.cancel()  # the handler closes it with 1013
        elif self.protocol.state is not State.OPEN:
            self.transport.abort()  # still in its HTTP handshake (or an HTTP request): cut off
        # else: open, its handler not yet waiting for the auth message; it sees ``evicted`` there



def connection_class(gate: Gate[Connection]) -> type[Connection]:
    """A connection class of one feed's own, that reports to ``gate``."""

    class FeedConnection(Connection):
        pass

    FeedConnection.gate = gate
    return FeedConnection
