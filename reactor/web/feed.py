"""The live feed: job events over a websocket, and the HTTP probes, on one port.

``GET /feed`` is the websocket; every other path is plain HTTP answered through websockets'
``process_request`` hook from :attr:`Feed.routes` (``/livez``, ``/readyz``, ``/metrics``; unknown
paths get 404, and a static dashboard can be added with ``feed.routes["/"] = handler``).

Protocol (every message is a JSON object with a ``type``; see README, "Live feed"):

* authenticate with ``Authorization: Bearer <jwt>`` at the handshake (servers; a bad token is a
  401), or with a first message ``{"type": "auth", "token": "...", "since": N?}`` (browsers; within
  ``auth_timeout_s``). Nothing is sent before a token is accepted; a refusal closes with 1008 and
  the reason. A later ``auth`` message for the same identity extends the session; at ``exp`` the
  connection is closed with 1008 "token expired". Every message is untrusted: one the parser
  refuses (too deep, odd numbers, bad unicode), one too many (``request_rate``), or a connection
  idle too long among too many others that never signed in (``max_unauthenticated``: the oldest is
  pushed out) closes that client alone; see README, "Limits";
* then ``snapshot`` ``{seq, stats, jobs, queue}``, or, with ``?since=N`` (or ``"since"``),
  ``resumed`` and exactly the events after N that the caller may see; when those are no longer
  kept, ``resync`` and a fresh snapshot;
* then ``event`` ``{seq, kind, at, job}`` for every job change, in seq order; ``stats`` (admins,
  coalesced), ``position`` (a user's queued jobs, as the queue moves), ``heartbeat`` ``{seq, at}``
  every ``heartbeat_s`` (its seq says: everything up to here has been sent to you).

How events flow: the listener's NOTIFY only wakes the pump, which reads ``reactor.events`` after
the last seq it holds (seq is gapless and committed in order, so that read is exact) into a ring
of the last ``max_lag`` events and writes them out in rounds, paced so that writing takes at most
``fanout_share`` of the event loop (events arriving meanwhile go out together in the next round).
A client that keeps up (its write buffer below ``write_buffer_bytes``) gets the round's frames in
one write, serialised once for all; one that falls behind is served by its
own task from the ring with ordinary backpressured sends, and is closed with 1013 "too slow" once
the ring no longer holds the next event it needs. A (re)connecting client catches up from the
database first. Nothing waits on a slow client but that client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http import HTTPStatus
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs
from uuid import UUID

import anyio
import anyio.lowlevel
import psycopg
from anyio.abc import TaskStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State

from reactor.core.errors import ConfigError
from reactor.core.logs import add_secret, dsn_secrets, redact
from reactor.db.sqlfiles import load_queries
from reactor.db.store import TRANSIENT_ERRORS, connect_kwargs
from reactor.engine.listener import Notice
from reactor.web import dashboard
from reactor.web.auth import Authenticator, AuthError, AuthSettings, Principal, load_jwks
from reactor.web.metrics import CONTENT_TYPE, Metrics

__all__ = ["FEED_PATH", "Feed", "FeedSettings", "HttpHandler", "http_response"]

logger = logging.getLogger(__name__)

FEED_PATH = "/feed"

#: an HTTP route: the parsed request in, a response out
HttpHandler = Callable[[Request], Awaitable[Response]]

_DB_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, PoolTimeout, psycopg.Error)
_DB_OR_TIMEOUT: tuple[type[Exception], ...] = (*_DB_ERRORS, TimeoutError)
_NO_LIMIT = 2**62
_READ_CHUNK = 1000

# close codes
_POLICY = CloseCode.POLICY_VIOLATION  # 1008: authentication, malformed messages, expiry
_UNSUPPORTED = CloseCode.UNSUPPORTED_DATA  # 1003: binary messages
_TRY_LATER = CloseCode.TRY_AGAIN_LATER  # 1013: too slow, too many clients
_INTERNAL = CloseCode.INTERNAL_ERROR  # 1011
#: closes logged (one line each): what the client sent was refused. Not logged: expiry, load shedding
_LOGGED_REFUSALS = frozenset({"bad_message", "auth", "rate_limited"})


@dataclass(frozen=True)
class FeedSettings:
    auth: AuthSettings
    host: str = "127.0.0.1"
    port: int = 0
    #: Origin values browsers may connect from; empty: any. Clients that send no Origin (servers,
    #: scripts: not a browser page) are always let through to authenticate.
    allowed_origins: tuple[str, ...] = ()
    #: authenticated clients at most (more: HTTP 503, or 1013 "too many clients" after an auth message)
    max_clients: int = 1000
    #: connections not yet authenticated at most (from the TCP accept to a token accepted; HTTP
    #: requests included); one more pushes out the oldest. None: max(100, max_clients // 2)
    max_unauthenticated: int | None = None
    #: largest message a client may send (an auth message with its token)
    max_message_bytes: int = 8192
    auth_timeout_s: float = 5.0
    #: messages a signed-in client may send (dashboard requests, fresh tokens): this many a second on
    #: average, in bursts of up to ``request_burst``; beyond that it is closed with 1008 "too many requests"
    request_rate: float = 20.0
    request_burst: int = 40
    heartbeat_s: float = 15.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    close_timeout_s: float = 3.0
    #: rounds of writes start at least this far apart (events arriving meanwhile go out together)...
    flush_interval_s: float = 0.005
    #: ...and far enough apart that writing them takes at most this share of the event loop's time
    #: (1,000 local clients: ~16 ms of CPU a round, so one every ~30 ms); the dispatcher keeps the rest
    fanout_share: float = 0.5
    stats_interval_s: float = 1.0
    position_interval_s: float = 0.5
    #: events kept in memory; a client further behind than this is closed as too slow
    max_lag: int = 10_000
    #: events a reconnecting client may ask to replay; further back it gets a resync
    max_replay: int = 10_000
    #: a client whose unsent output exceeds this is served by its own task (backpressure)
    write_buffer_bytes: int = 64 * 1024
    #: SO_SNDBUF of each feed connection, bounding what the kernel holds for a client that does not
    #: read; None: the kernel's default (autotuned, up to net.ipv4.tcp_wmem's maximum)
    send_buffer_bytes: int | None = None
    snapshot_jobs: int = 50
    snapshot_queue: int = 50
    #: admins share a snapshot taken this recently (a reconnect storm costs one query)
    snapshot_cache_s: float = 1.0
    pool_size: int = 4
    #: serve https/wss with this certificate chain and key (PEM); None: plain http/ws
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_clients", "request_burst", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"the feed's {name} must be at least 1")
        if self.max_unauthenticated is not None and self.max_unauthenticated < 1:
            raise ConfigError("the feed's max_unauthenticated must be at least 1")
        if not self.request_rate > 0:
            raise ConfigError("the feed's request_rate must be above 0")

    @property
    def unauthenticated_limit(self) -> int:
        if self.max_unauthenticated is not None:
            return self.max_unauthenticated
        return max(100, self.max_clients // 2)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from PEM files (TLS 1.2 or newer), or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from exc
    return ctx


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def http_response(
    status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A complete HTTP response for a route (the connection is closed after it)."""
    data = body.encode() if isinstance(body, str) else body
    h = Headers([
        ("Content-Type", content_type), ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"), ("Connection", "close"),
    ])
    for k, v in (headers or {}).items():
        h[k] = v
    code = HTTPStatus(status)
    return Response(code.value, code.phrase, h, data)


def _json_response(status: int, body: Mapping[str, Any]) -> Response:
    return http_response(status, _dumps(body), "application/json")


# -- wire format --------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()


def _frame(payload: bytes) -> bytes:
    """One unmasked text frame (a server's frames are the same bytes for every client)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


_JOB_FIELDS = (
    "id", "status", "priority", "job_type", "renderer", "user_id", "retry_count", "max_retries",
    "error_category", "error_message", "created_at", "updated_at", "started_at", "completed_at",
)


def _job(row: Mapping[str, Any]) -> dict[str, Any]:
    job = {k: row[k] for k in _JOB_FIELDS}
    if row.get("video_url"):
        job["video_url"] = row["video_url"]
    if "queue_position" in row:
        job["queue_position"] = row["queue_position"]
    return job


@dataclass(frozen=True, slots=True)
class _Entry:
    """One event, serialised once: for admins (with the actor) and for the job's user."""

    seq: int
    user_id: UUID | None
    admin: bytes
    user: bytes | None


def _entry(row: Mapping[str, Any]) -> _Entry:
    job: dict[str, Any] = {
        "id": row["job_id"], "status": row["status"], "old_status": row["old_status"],
        "priority": row["priority"], "job_type": row["job_type"], "renderer": row["renderer"],
        "user_id": row["user_id"], "retry_count": row["retry_count"], "error_category": row["error_category"],
    }
    if row.get("video_url"):
        job["video_url"] = row["video_url"]
    msg = {"type": "event", "seq": row["seq"], "kind": row["kind"], "at": row["at"], "job": job}
    user = _dumps(msg) if row["user_id"] is not None else None
    msg["actor"] = row["actor"]
    return _Entry(row["seq"], row["user_id"], _dumps(msg), user)


def _moves_queue(row: Mapping[str, Any]) -> bool:
    return bool(row["status"] == "queued" or row["old_status"] == "queued")


class _Ring:
    """The last ``capacity`` events, by seq (contiguous): seq s is held when base < s <= last."""

    def __init__(self, capacity: int, base: int) -> None:
        self.capacity = capacity
        self._slots: list[_Entry | None] = [None] * capacity
        self.base = base
        self.last = base

    def reset(self, base: int) -> None:
        self._slots = [None] * self.capacity
        self.base = self.last = base

    def append(self, entry: _Entry) -> None:
        assert entry.seq == self.last + 1
        self._slots[entry.seq % self.capacity] = entry
        self.last = entry.seq
        if self.last - self.base > self.capacity:
            self.base = self.last - self.capacity

    def get(self, seq: int) -> _Entry | None:
        if self.base < seq <= self.last:
            return self._slots[seq % self.capacity]
        return None


class _Refused(Exception):
    def __init__(self, code: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.metric = metric


class _BadRequest(Exception):
    """An HTTP request refused at the handshake with 400 and this reason."""


K = TypeVar("K")


class _Gate(Generic[K]):
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


class _TokenBucket:
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


class _Connection(ServerConnection):
    """A feed connection, known to the feed's :class:`_Gate` from its first byte to its last."""

    gate: _Gate[_Connection]  # set on the subclass each Feed makes (see Feed._connection_class)

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


@dataclass
class _Handshake:
    principal: Principal | None
    since: int | None


@dataclass(eq=False)
class _Client:
    ws: ServerConnection
    principal: Principal
    #: its messages' budget (dashboard requests, fresh tokens)
    bucket: _TokenBucket = field(default_factory=lambda: _TokenBucket(20.0, 40.0))
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

    def payload(self, entry: _Entry) -> bytes | None:
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


class _Store:
    """The feed's own small pool, so that feed reads never queue behind (or ahead of) claims."""

    def __init__(self, dsn: str, size: int) -> None:
        self._q = load_queries("feed.sql")
        self.pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=size, kwargs={**connect_kwargs(), "application_name": "reactor feed"},
            check=AsyncConnectionPool.check_connection, open=False, name="feed",
        )

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    async def rows(self, name: str, params: Mapping[str, Any] | None = None,
                   wait_s: float = 30.0) -> list[dict[str, Any]]:
        async with self.pool.connection(timeout=wait_s) as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self._q[name], params or {})
            return await cur.fetchall()

    async def snapshot(self, user_id: UUID | None, jobs: int, queue: int) -> dict[str, Any]:
        """Stats, recent jobs and the queue's head (or a user's own jobs), as of one seq."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if user_id is None:
                await cur.execute(self._q["feed_stats"])
                stats = await cur.fetchone()
                assert stats is not None
                seq, stats_out = int(stats["last_seq"]), dict(stats)
                await cur.execute(self._q["feed_recent_jobs"], {"limit": jobs})
                recent = await cur.fetchall()
                await cur.execute(self._q["feed_queue_head"], {"limit": queue})
                head = await cur.fetchall()
            else:
                await cur.execute(self._q["feed_bounds"])
                bounds = await cur.fetchone()
                assert bounds is not None
                seq, stats_out = int(bounds["last_seq"]), None
                await cur.execute(self._q["feed_user_jobs"], {"user_id": user_id, "limit": jobs})
                recent = await cur.fetchall()
                await cur.execute(self._q["feed_user_queue"], {"user_id": user_id, "limit": queue})
                head = await cur.fetchall()
        return {"seq": seq, "stats": stats_out, "jobs": [_job(r) for r in recent], "queue": [_job(r) for r in head]}

    async def ping(self, wait_s: float) -> str | None:
        """None if the database answers within ``wait_s``, else why not."""
        try:
            with anyio.fail_after(wait_s):
                await self.rows("feed_ping", wait_s=wait_s)
        except TimeoutError:
            return "no answer"
        except _DB_ERRORS as exc:
            return " ".join(str(exc).split())[:200] or type(exc).__name__
        return None


class Feed:
    """The websocket feed and HTTP probes of one reactor (run it in the service's task group)."""

    def __init__(
        self,
        settings: FeedSettings,
        dsn: str,
        *,
        metrics: Metrics | None = None,
        authenticator: Authenticator | None = None,
        listener_connected: Callable[[], bool] = lambda: True,
        stopping: Callable[[], bool] = lambda: False,
        parts: Callable[[], tuple[bool, Mapping[str, str]]] = lambda: (True, {}),
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(actor="")
        if authenticator is None:
            # read the JWKS now: a missing or unusable one fails before anything starts
            keys = load_jwks(settings.auth.jwks) if settings.auth.jwks else None
            authenticator = Authenticator(settings.auth, keys)
        self.auth = authenticator
        # whatever goes wrong, these never reach a log line or an answer (reactor.core.logs hides them)
        add_secret(settings.auth.jwt_secret)
        for secret in dsn_secrets(dsn):
            add_secret(secret)
        self._store = _Store(dsn, settings.pool_size)
        self._listener_connected = listener_connected
        self._stopping = stopping
        self._parts = parts  # (every required part runs, each part's state): reactor/engine/supervise.py
        self.routes: dict[str, HttpHandler] = {
            "/livez": self._livez, "/readyz": self._readyz, "/metrics": self._metrics,
        }
        # the admin dashboard: its page at /, and its requests on the feed (reactor/web/dashboard.py)
        self.routes.update(dashboard.static_routes())
        self._requests = dashboard.Requests(dsn, self._store.pool)
        self.port: int | None = None
        self._server: Server | None = None
        self._ring = _Ring(settings.max_lag, 0)
        self._clients: set[_Client] = set()
        self._users: dict[UUID, set[_Client]] = {}
        self._gate: _Gate[_Connection] = _Gate(settings.max_clients, settings.unauthenticated_limit)
        self._refusal_log = _TokenBucket(rate=10.0, burst=50.0)  # refusals logged, at most
        self._refusals_unlogged = 0
        self._handshakes: weakref.WeakKeyDictionary[ServerConnection, _Handshake] = weakref.WeakKeyDictionary()
        self._pump_wake = anyio.Event()
        self._stats_wake = anyio.Event()
        self._positions_wake = anyio.Event()
        self._check_reset = False
        self._reset_reason: str | None = None
        self._next_round = 0.0  # monotonic time before which the pump does not start a round
        self._delivered = 0  # the pump has written (or handed to clients' tasks) every event up to here
        self._snapshot_lock = anyio.Lock()
        self._snapshot_cache: tuple[float, int, bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.tls_cert else "ws"
        return f"{scheme}://{self.settings.host}:{self.port}{FEED_PATH}"

    @property
    def clients(self) -> int:
        """Authenticated clients connected now."""
        return len(self._clients)

    @property
    def unauthenticated(self) -> int:
        """Connections open now that have not (yet) authenticated."""
        return self._gate.unauthenticated

    def _connection_class(self) -> type[_Connection]:
        gate = self._gate

        class Connection(_Connection):
            pass

        Connection.gate = gate
        return Connection

    @property
    def last_seq(self) -> int:
        """The last event seq the feed has read."""
        return self._ring.last

    # -- wake-ups from the listener ------------------------------------------------------------

    def on_notice(self, notice: Notice) -> None:
        forward = dashboard.notice_message(notice)  # alerts and circuit changes: to admins, now
        if forward is not None:
            self._to_admins(forward)
            return
        if notice.channel == "reactor_config":
            self._stats_wake.set()
            return
        if notice.payload.get("truncated"):
            self._reset_reason = "jobs were truncated"
            self._pump_wake.set()
            return
        seq = notice.payload.get("seq")
        if not isinstance(seq, int) or seq > self._ring.last:
            self._pump_wake.set()

    def _to_admins(self, payload: bytes) -> None:
        """A message for every admin that keeps up (one behind misses it: the dashboard re-reads
        the same state with a ``status`` request at each heartbeat)."""
        frame = _frame(payload)
        for c in list(self._clients):
            if c.admin and not c.lagging:
                self._write_now(c, frame)

    def on_connect(self) -> None:
        """The listener (re)connected: read whatever was committed meanwhile."""
        self._check_reset = True
        self._pump_wake.set()

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started()`` once the port is bound."""
        s = self.settings
        await self._store.open()
        server: Server | None = None
        try:
            [bounds] = await self._store.rows("feed_bounds")
            self._ring.reset(int(bounds["last_seq"]))
            self._delivered = self._ring.last
            tls = tls_context(s.tls_cert, s.tls_key)
            if tls is None and not _loopback(s.host):
                logger.warning(
                    "serving plain HTTP on %s: tokens and job data travel unencrypted; use --tls-cert and "
                    "--tls-key, or terminate TLS in a reverse proxy (deploy/nginx-reactor.conf)", s.host)
            server = await serve(
                self._handler, s.host, s.port, ssl=tls,
                process_request=self._process_request, create_connection=self._connection_class(),
                compression=None,  # frames are written once for all clients; deflate is per client
                max_size=s.max_message_bytes, max_queue=4, write_limit=s.write_buffer_bytes,
                ping_interval=s.ping_interval_s, ping_timeout=s.ping_timeout_s,
                close_timeout=s.close_timeout_s, server_header="reactor",
            )
            self._server = server
            self.port = int(server.sockets[0].getsockname()[1])
            logger.info("feed listening", extra={"url": self.url})
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump)
                tg.start_soon(self._stats_loop)
                tg.start_soon(self._positions_loop)
                tg.start_soon(self._heartbeat_loop)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                if server is not None:
                    server.close()  # clients get 1001 (going away) and resume elsewhere
                    with anyio.move_on_after(s.close_timeout_s + 1):
                        await server.wait_closed()
                await self._store.close()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path != FEED_PATH:
            route = self.routes.get(path)
            if route is None:
                return http_response(404, "not found\n")
            return await route(request)
        s = self.settings
        try:
            origin = _single_header(request.headers, "Origin")
            header = _single_header(request.headers, "Authorization")
            since: int | None = None
            values = parse_qs(query).get("since")
            if values:
                since = _nonneg_int(values[0])
                if since is None:
                    raise _BadRequest("since must be a whole number")
        except _BadRequest as exc:
            self._refused(ws, 400, str(exc), "bad_request")
            return http_response(400, f"{exc}\n")
        if s.allowed_origins and origin is not None and origin not in s.allowed_origins:
            return http_response(403, "origin not allowed\n")
        if self._gate.full:
            return http_response(503, "too many clients\n", headers={"Retry-After": "5"})
        principal: Principal | None = None
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            try:
                if scheme.lower() != "bearer" or not token.strip():
                    raise AuthError("expected Authorization: Bearer <token>")
                principal = await self.auth.authenticate(token.strip())
            except AuthError as exc:
                self.metrics.client_dropped("auth")
                self._refused(ws, 401, str(exc), "auth")
                return http_response(401, f"invalid token: {exc}\n",
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            if not isinstance(ws, _Connection) or not self._gate.authenticate(ws):
                return http_response(503, "too many clients\n", headers={"Retry-After": "5"})
        self._handshakes[ws] = _Handshake(principal, since)
        return None

    def _refused(self, ws: ServerConnection, code: int, reason: str, metric: str) -> None:
        """One log line for a client refused for what it sent (at most ~10 a second under a flood;
        the next line says how many were not logged)."""
        if not self._refusal_log.take(time.monotonic()):
            self._refusals_unlogged += 1
            return
        extra: dict[str, object] = {"code": code, "why": metric, "peer": _peer(ws)}
        if self._refusals_unlogged:
            extra["unlogged_before"], self._refusals_unlogged = self._refusals_unlogged, 0
        logger.info("feed client refused: %s", reason, extra=extra)

    async def _livez(self, request: Request) -> Response:
        return http_response(200, "ok\n")

    async def _readyz(self, request: Request) -> Response:
        problem = await self._store.ping(wait_s=2.0)
        if problem is not None:
            problem = redact(problem)  # unauthenticated callers read this
        listening = self._listener_connected()
        stopping = self._stopping()
        parts_up, parts = self._parts()
        ready = problem is None and listening and not stopping and parts_up
        body = {
            "ready": ready,
            "database": "ok" if problem is None else f"unavailable: {problem}",
            "listener": "connected" if listening else "disconnected",
            "stopping": stopping,
            **({"parts": dict(parts)} if parts else {}),
        }
        return _json_response(200 if ready else 503, body)

    async def _metrics(self, request: Request) -> Response:
        row: dict[str, Any] | None = None
        try:
            with anyio.fail_after(2.0):
                rows = await self._store.rows("feed_metrics", wait_s=2.0)
            row = rows[0] if rows else None
        except _DB_OR_TIMEOUT:
            row = None
        self.metrics.update_database(row)
        return http_response(200, self.metrics.exposition(), CONTENT_TYPE)

    # -- one connection ------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        handshake = self._handshakes.pop(ws, None) or _Handshake(None, None)
        if self.settings.send_buffer_bytes is not None:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer_bytes)
        client: _Client | None = None
        try:
            principal, since = handshake.principal, handshake.since
            if principal is None:
                principal, first_since = await self._first_message(ws)
                since = first_since if first_since is not None else since
                if isinstance(ws, _Connection) and not self._gate.authenticate(ws):
                    if ws.evicted:
                        raise _Refused(_TRY_LATER, "too many unauthenticated connections", "unauthenticated")
                    raise _Refused(_TRY_LATER, "too many clients", "too_many_clients")
            client = _Client(ws, principal, bucket=_TokenBucket(self.settings.request_rate,
                                                                 self.settings.request_burst))
            async with anyio.create_task_group() as tg:
                client.scope = tg.cancel_scope
                tg.start_soon(self._reader, client)
                tg.start_soon(self._expiry, client)
                tg.start_soon(self._session, client, since)
        except _Refused as exc:
            self.metrics.client_dropped(exc.metric)
            if exc.metric in _LOGGED_REFUSALS:
                self._refused(ws, exc.code, exc.reason, exc.metric)
            await self._close(ws, exc.code, exc.reason)
            return
        except ConnectionClosed:
            return
        finally:
            if client is not None:
                self._unregister(client)
        if client.close_code is not None:
            if client.close_metric:
                self.metrics.client_dropped(client.close_metric)
            if client.close_metric in _LOGGED_REFUSALS:
                self._refused(ws, client.close_code, client.close_reason, client.close_metric)
            await self._close(ws, client.close_code, client.close_reason)

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close with a code; a peer that does not read (and so cannot see it) is cut off."""
        with anyio.move_on_after(self.settings.close_timeout_s):
            await ws.close(code, reason)
        if ws.protocol.state is not State.CLOSED:
            ws.transport.abort()

    async def _first_message(self, ws: ServerConnection) -> tuple[Principal, int | None]:
        conn = ws if isinstance(ws, _Connection) else None
        raw: str | bytes | None = None
        try:
            with anyio.fail_after(self.settings.auth_timeout_s), anyio.CancelScope() as scope:
                if conn is not None:
                    conn.auth_scope = scope
                    if conn.evicted:
                        scope.cancel()
                raw = await ws.recv()
        except TimeoutError:
            raise _Refused(_POLICY, "authentication timeout: send {\"type\": \"auth\", \"token\": ...}",
                           "auth") from None
        finally:
            if conn is not None:
                conn.auth_scope = None
        if raw is None:  # pushed out by newer connections before it authenticated
            raise _Refused(_TRY_LATER, "too many unauthenticated connections", "unauthenticated")
        token, since = _auth_message(_parse(raw))
        try:
            return await self.auth.authenticate(token), since
        except AuthError as exc:
            raise _Refused(_POLICY, str(exc), "auth") from None

    async def _reader(self, c: _Client) -> None:
        """What a client may send after authenticating: a fresh token for the same identity, or one of
        the dashboard's requests (``job``, ``status``, ``action``; answered by reactor/web/dashboard.py),
        ``request_rate`` a second (bursts of ``request_burst``)."""
        try:
            async for raw in c.ws:
                if not c.bucket.take(time.monotonic()):
                    c.close(_POLICY, "too many requests", "rate_limited")
                    return
                try:
                    msg = _parse(raw)
                except _Refused as exc:
                    c.close(exc.code, exc.reason, exc.metric)
                    return
                if msg.get("type") in dashboard.REQUEST_TYPES:  # the dashboard's job, status, action
                    await c.ws.send(await self._requests.answer(c.principal, msg), text=True)
                    continue
                if msg.get("type") != "auth":
                    c.close(_POLICY, f"unknown message type {str(msg.get('type'))[:32]!r}", "bad_message")
                    return
                token = msg.get("token")
                if not isinstance(token, str) or not token:
                    c.close(_POLICY, "malformed message: token must be a string", "bad_message")
                    return
                try:
                    principal = await self.auth.authenticate(token)
                except AuthError as exc:
                    c.close(_POLICY, str(exc), "auth")
                    return
                if not principal.same_identity(c.principal):
                    c.close(_POLICY, "token is for someone else", "auth")
                    return
                c.principal = principal
        except ConnectionClosed:
            pass
        c.close(None)

    async def _expiry(self, c: _Client) -> None:
        while True:
            expires = c.principal.expires_at
            await anyio.sleep(max(0.0, expires + self.settings.auth.leeway_s - time.time()))
            if c.principal.expires_at == expires:
                c.close(_POLICY, "token expired", "token_expired")
                return

    async def _session(self, c: _Client, since: int | None) -> None:
        try:
            await self._start(c, since)
            while True:
                await self._catch_up(c)
                await c.wake.wait()
                c.wake = anyio.Event()
        except ConnectionClosed:
            c.close(None)
        except _DB_ERRORS as exc:
            logger.warning("feed client dropped: database unavailable: %s", exc)
            c.close(_TRY_LATER, "database unavailable, try again", "database")
        except Exception:
            logger.exception("feed session failed")
            c.close(_INTERNAL, "internal error", "error")

    async def _start(self, c: _Client, since: int | None) -> None:
        """Snapshot or resume, then hand the client to the pump (its own task catches up first)."""
        if since is None:
            await self._send_snapshot(c)
        else:
            [b] = await self._store.rows("feed_bounds")
            last = int(b["last_seq"])
            oldest = int(b["oldest"]) if b["oldest"] is not None else last + 1
            reason = None
            if since > last:
                reason = "seq is ahead of this database"
            elif since + 1 < oldest:
                reason = "events after seq are no longer kept"
            elif last - since > self.settings.max_replay:
                reason = "too far behind to replay"
            if reason is not None:
                await c.ws.send(_dumps({"type": "resync", "reason": reason}), text=True)
                await self._send_snapshot(c, fresh=True)
            else:
                await c.ws.send(_dumps({"type": "resumed", "since": since}), text=True)
                c.cursor = since
                if c.user_id is not None and not c.admin:
                    rows = await self._store.rows(
                        "feed_user_queue", {"user_id": c.user_id, "limit": self.settings.snapshot_queue})
                    for r in rows:
                        c.queued[r["id"]] = r["queue_position"]
                        c.pending_positions[r["id"]] = r["queue_position"]
        self._register(c)
        if since is not None and c.admin:
            self._stats_wake.set()  # a snapshot carries the figures; a resume gets them after its events

    async def _send_snapshot(self, c: _Client, *, fresh: bool = False) -> None:
        if c.admin:
            seq, payload = await self._admin_snapshot(fresh)
        else:
            snap = await self._store.snapshot(c.user_id, self.settings.snapshot_jobs, self.settings.snapshot_queue)
            seq = snap["seq"]
            payload = _dumps({"type": "snapshot", **snap})
            c.queued = {j["id"]: j["queue_position"] for j in snap["queue"]}
        await c.ws.send(payload, text=True)
        c.cursor = seq

    async def _admin_snapshot(self, fresh: bool) -> tuple[int, bytes]:
        """One admin snapshot for everyone who asks within ``snapshot_cache_s`` (while the ring still
        holds the events after it, so nobody catching up from it needs the database)."""
        async with self._snapshot_lock:
            cached = self._snapshot_cache
            if (not fresh and cached is not None and cached[1] >= self._ring.base
                    and time.monotonic() - cached[0] < self.settings.snapshot_cache_s):
                return cached[1], cached[2]
            snap = await self._store.snapshot(None, self.settings.snapshot_jobs, self.settings.snapshot_queue)
            payload = _dumps({"type": "snapshot", **snap})
            self._snapshot_cache = (time.monotonic(), snap["seq"], payload)
            return snap["seq"], payload

    def _register(self, c: _Client) -> None:
        c.catchup_until = max(c.cursor, self._ring.last)
        c.lagging = True
        self._clients.add(c)
        if not c.admin and c.user_id is not None:
            self._users.setdefault(c.user_id, set()).add(c)
        self._count_clients()
        c.poke()

    def _unregister(self, c: _Client) -> None:
        if c in self._clients:
            self._clients.discard(c)
            if c.user_id is not None and not c.admin:
                mates = self._users.get(c.user_id)
                if mates is not None:
                    mates.discard(c)
                    if not mates:
                        del self._users[c.user_id]
            self._count_clients()

    def _count_clients(self) -> None:
        users = sum(len(mates) for mates in self._users.values())
        self.metrics.feed_clients.labels("admin").set(len(self._clients) - users)
        self.metrics.feed_clients.labels("user").set(users)

    # -- a client's own task: catching up, and whenever its output backs up --------------------

    async def _catch_up(self, c: _Client) -> None:
        ring = self._ring
        while True:
            if c.resync is not None:
                reason, c.resync = c.resync, None
                c.pending_positions.clear()
                await c.ws.send(_dumps({"type": "resync", "reason": reason}), text=True)
                await self._send_snapshot(c, fresh=True)
                c.catchup_until = max(c.cursor, ring.last)
                continue
            nxt = c.cursor + 1
            if nxt <= ring.last:
                entry = ring.get(nxt)
                if entry is None:  # no longer in memory
                    if c.cursor >= c.catchup_until:
                        c.close(_TRY_LATER, "too slow", "too_slow")
                        return
                    await self._replay(c, upto=ring.base)
                    continue
                c.cursor = nxt
                payload = c.payload(entry)
                if payload is not None:
                    await c.ws.send(payload, text=True)
                continue
            if c.pending_stats is not None:
                payload, c.pending_stats = c.pending_stats, None
                await c.ws.send(payload, text=True)
                continue
            if c.pending_positions:
                job_id, position = c.pending_positions.popitem()
                await c.ws.send(_position(job_id, position), text=True)
                continue
            if c.pending_heartbeat:
                c.pending_heartbeat = False
                await c.ws.send(_heartbeat(c.cursor), text=True)
                continue
            c.lagging = False  # caught up and drained: the pump writes from here on
            return

    async def _replay(self, c: _Client, upto: int) -> None:
        """Events (cursor, upto] from the database, in chunks, with backpressure."""
        upto = max(upto, c.cursor)
        rows = await self._store.rows("feed_events", {
            "after": c.cursor, "upto": upto, "limit": _READ_CHUNK,
            "user_id": None if c.admin else c.user_id,
        })
        for row in rows:
            entry = _entry(row)
            payload = c.payload(entry)
            c.cursor = entry.seq
            if payload is not None:
                await c.ws.send(payload, text=True)
        if len(rows) < _READ_CHUNK:
            c.cursor = max(c.cursor, upto)

    def _lag(self, c: _Client) -> None:
        c.lagging = True
        c.poke()

    def _write_now(self, c: _Client, data: bytes) -> bool:
        """Write frames at once if the client keeps up; False if it must catch up on its own.

        Whole frames go straight to the transport: websockets writes its own frames (pings, close)
        whole and synchronously too, so the stream stays well formed, and compression is off.
        """
        ws = c.ws
        if c.closed or ws.protocol.state is not State.OPEN:
            return False
        transport = ws.transport
        if transport.get_write_buffer_size() > self.settings.write_buffer_bytes:
            return False
        transport.write(data)
        return True

    # -- the pump: events from the database to every client ------------------------------------

    async def _pump(self) -> None:
        backoff = 0.1
        while True:
            await self._pump_wake.wait()
            self._pump_wake = anyio.Event()
            delay = self._next_round - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            started = time.monotonic()
            try:
                if self._check_reset:
                    self._check_reset = False
                    await self._check_database()
                if self._reset_reason is not None:
                    reason, self._reset_reason = self._reset_reason, None
                    [b] = await self._store.rows("feed_bounds")
                    self._reset(int(b["last_seq"]), reason)
                rows = await self._store.rows("feed_events", {
                    "after": self._ring.last, "upto": _NO_LIMIT, "limit": _READ_CHUNK, "user_id": None,
                })
            except _DB_ERRORS as exc:
                logger.warning("feed cannot read events (retry in %.1f s): %s", backoff, exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._pump_wake.set()
                continue
            backoff = 0.1
            if rows:
                if rows[0]["seq"] != self._ring.last + 1:
                    self._reset(int(rows[0]["seq"]) - 1, "events are missing")
                entries = self._ingest(rows)
                cpu = time.thread_time()
                await self._fan_out(entries)
                self._delivered = entries[-1].seq
                # pace by the CPU the round cost, not its wall time: a round the OS preempted must not
                # push the next one further back
                spent = time.thread_time() - cpu
                s = self.settings
                self._next_round = started + max(s.flush_interval_s, spent / s.fanout_share)
            if len(rows) == _READ_CHUNK:
                self._pump_wake.set()

    async def _check_database(self) -> None:
        [b] = await self._store.rows("feed_bounds")
        if int(b["last_seq"]) < self._ring.last:
            self._reset(int(b["last_seq"]), "the event log restarted")

    def _reset(self, base: int, reason: str) -> None:
        """The log cannot be followed from where we are: start over, and resync every client."""
        logger.warning("feed resync: %s", reason, extra={"seq": base})
        self._ring.reset(base)
        self._delivered = base
        self._snapshot_cache = None
        for c in self._clients:
            c.resync = reason
            self._lag(c)

    def _ingest(self, rows: list[dict[str, Any]]) -> list[_Entry]:
        entries = []
        queue_moved = False
        ring = self._ring
        base_before = ring.base
        for row in rows:
            self.metrics.observe_event(row)
            entry = _entry(row)
            ring.append(entry)
            entries.append(entry)
            if _moves_queue(row):
                queue_moved = True
                uid = entry.user_id
                if uid is not None and uid in self._users:
                    for c in self._users[uid]:
                        if row["status"] == "queued":
                            c.queued.setdefault(row["job_id"], None)
                        else:
                            c.queued.pop(row["job_id"], None)
        self._stats_wake.set()
        if queue_moved:
            self._positions_wake.set()
        if ring.base != base_before:
            for c in list(self._clients):
                if c.lagging and c.cursor < ring.base and c.cursor >= c.catchup_until:
                    c.close(_TRY_LATER, "too slow", "too_slow")
        return entries

    async def _fan_out(self, entries: list[_Entry]) -> None:
        """One round: each client that keeps up gets its frames of these events in one write."""
        first, last = entries[0].seq, entries[-1].seq
        admin_frames = b"".join(_frame(e.admin) for e in entries)  # serialised once for every admin
        by_user: dict[UUID, list[_Entry]] = {}
        for e in entries:
            if e.user_id is not None and e.user_id in self._users:
                by_user.setdefault(e.user_id, []).append(e)
        user_frames: dict[UUID, bytes] = {}
        limit, is_open, before = self.settings.write_buffer_bytes, State.OPEN, first - 1
        for i, c in enumerate(list(self._clients)):
            if i & 63 == 63:
                await anyio.lowlevel.checkpoint()  # a long round must not hold up the reactor's other tasks
            if c.lagging or c.closed:
                continue
            if c.cursor != before:
                if c.cursor < last:
                    self._lag(c)  # not where this round starts: its own task sorts it out
                continue
            if c.is_admin:
                data = admin_frames
            else:
                uid = c.user_id
                mine = by_user.get(uid) if uid is not None else None
                if not mine or uid is None:
                    c.cursor = last
                    continue
                if uid not in user_frames:
                    user_frames[uid] = b"".join(_frame(e.user) for e in mine if e.user is not None)
                data = user_frames[uid]
            # _write_now, inlined: this loop runs once per client per round
            transport = c.transport
            if c.protocol.state is is_open and transport.get_write_buffer_size() <= limit:
                transport.write(data)
                c.cursor = last
            else:
                self._lag(c)

    # -- coalesced messages --------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await self._stats_wake.wait()
            self._stats_wake = anyio.Event()
            if not any(c.admin for c in self._clients):
                continue
            try:
                [stats] = await self._store.rows("feed_stats")
            except _DB_ERRORS as exc:
                logger.debug("feed cannot read stats: %s", exc)
                await anyio.sleep(self.settings.stats_interval_s)
                continue
            # figures as of seq N go out after the events up to N (give the pump a moment)
            with anyio.move_on_after(2.0):
                while self._delivered < stats["last_seq"]:
                    self._pump_wake.set()
                    await anyio.sleep(self.settings.flush_interval_s)
            payload = _dumps({"type": "stats", "seq": stats["last_seq"], "stats": stats})
            frame = _frame(payload)
            for c in list(self._clients):
                if c.admin and not self._offer(c, frame):
                    c.pending_stats = payload
            await anyio.sleep(self.settings.stats_interval_s)

    async def _positions_loop(self) -> None:
        while True:
            await self._positions_wake.wait()
            self._positions_wake = anyio.Event()
            watching = [c for c in self._clients if c.queued]
            ids = list({job_id for c in watching for job_id in c.queued})
            if ids:
                try:
                    rows = await self._store.rows("feed_positions", {"ids": ids})
                except _DB_ERRORS as exc:
                    logger.debug("feed cannot read positions: %s", exc)
                    rows = None
                if rows is not None:
                    positions = {r["id"]: int(r["queue_position"]) for r in rows}
                    for c in watching:
                        self._update_positions(c, positions)
            await anyio.sleep(self.settings.position_interval_s)

    def _update_positions(self, c: _Client, positions: Mapping[UUID, int]) -> None:
        for job_id, sent in list(c.queued.items()):
            now = positions.get(job_id)
            if now is None:
                del c.queued[job_id]  # no longer queued: its event says so
                continue
            if now != sent:
                c.queued[job_id] = now

                if not self._offer(c, _frame(_position(job_id, now))):
                    c.pending_positions[job_id] = now

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            self._pump_wake.set()  # and a look at the table, in case a wake-up was lost
            frames: dict[int, bytes] = {}
            for c in list(self._clients):
                if c.cursor not in frames:
                    frames[c.cursor] = _frame(_heartbeat(c.cursor))
                if not self._offer(c, frames[c.cursor]):
                    c.pending_heartbeat = True

    def _offer(self, c: _Client, frame: bytes) -> bool:
        """Write a frame now if the client keeps up; False (and its task woken) if it must wait."""
        if c.closed:
            return True
        if not c.lagging and self._write_now(c, frame):
            return True
        self._lag(c)
        return False


def _position(job_id: UUID, position: int) -> bytes:
    return _dumps({"type": "position", "job_id": job_id, "queue_position": position})


def _heartbeat(seq: int) -> bytes:
    return _dumps({"type": "heartbeat", "seq": seq, "at": datetime.now(UTC)})


#: a client message nests at most this deep (the protocol's messages nest 2 deep)
_MAX_DEPTH = 8
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_MAX_INT_DIGITS = 20
_MAX_SEQ = 2**62


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError("number out of range")
    return int(text)


def _too_deep(text: str) -> bool:
    """True if the brackets outside strings nest deeper than _MAX_DEPTH (checked before parsing:
    json.loads recurses once per level)."""
    depth = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _valid_strings(value: object) -> bool:
    """False if a string (key or value) holds a lone surrogate ("\\ud800"): it could not be sent back."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _parse(raw: str | bytes) -> dict[str, Any]:
    """A client's message: a JSON object with a type, as text; anything else closes that client.

    Shape first (nesting depth), then a parser that refuses what JSON allows but nobody means: NaN,
    Infinity, 1e999, integers longer than 20 digits, lone surrogates. Raises only :class:`_Refused`.
    """
    if isinstance(raw, bytes):
        raise _Refused(_UNSUPPORTED, "binary messages are not accepted", "bad_message")
    if _too_deep(raw):
        raise _Refused(_POLICY, "malformed message: nested too deep", "bad_message")
    try:
        msg = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except (ValueError, RecursionError):
        raise _Refused(_POLICY, "malformed message: not JSON", "bad_message") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise _Refused(_POLICY, "malformed message: expected an object with a type", "bad_message")
    if not _valid_strings(msg):
        raise _Refused(_POLICY, "malformed message: invalid unicode", "bad_message")
    return msg


def _auth_message(msg: Mapping[str, Any]) -> tuple[str, int | None]:
    """The token and the ``since`` of a first message, which must be ``auth``; raises :class:`_Refused`."""
    if msg.get("type") != "auth":
        raise _Refused(_POLICY, "expected an auth message first", "bad_message")
    since: int | None = None
    if msg.get("since") is not None:
        since = _nonneg_int(msg["since"])
        if since is None:
            raise _Refused(_POLICY, "malformed message: since must be a whole number", "bad_message")
    token = msg.get("token")
    if not isinstance(token, str) or not token:
        raise _Refused(_POLICY, "malformed message: token must be a string", "bad_message")
    return token, since


def _nonneg_int(value: object) -> int | None:
    """A seq from a client: a JSON integer or a string of ASCII digits (not "١٢٣", not "１２")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < _MAX_SEQ else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    return None


def _single_header(headers: Headers, name: str) -> str | None:
    """A header that must appear at most once (two Origin or Authorization headers: a 400)."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise _BadRequest(f"more than one {name} header")
    return values[0] if values else None


def _peer(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except (AttributeError, OSError):
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
