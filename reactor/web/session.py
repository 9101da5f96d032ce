"""One feed connection, from its handshake to its close: sign-in, requests, expiry, catching up.

A connection authenticates with ``Authorization: Bearer <jwt>`` at the handshake (servers; a bad
token is a 401), or with a first message ``{"type": "auth", "token": "...", "since": N?}``
(browsers; within ``auth_timeout_s``). Nothing is sent before a token is accepted; a refusal closes
with 1008 and the reason. A later ``auth`` message for the same identity extends the session; at
``exp`` the connection is closed with 1008 "token expired". Then ``snapshot``, or ``resumed`` and
the events after ``since`` (``resync`` and a fresh snapshot when those are no longer kept); then the
client is handed to the fan-out (reactor/web/fanout.py). Its own task sends whenever it is behind:
catching up from the ring or, further back, from the database.

Requests a signed-in client sends besides ``auth`` (the dashboard's) are answered by the
:class:`RequestHandler` plugged into the feed, if any.
"""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from reactor.core.errors import DatabaseError
from reactor.db.feed import FeedStore
from reactor.web import wire
from reactor.web.auth import Authenticator, AuthError, Principal
from reactor.web.client import Client
from reactor.web.fanout import READ_CHUNK, FanOut, track_queue
from reactor.web.gate import Connection, Gate, TokenBucket
from reactor.web.http import http_response
from reactor.web.metrics import Metrics
from reactor.web.protocol import (
    INTERNAL,
    LOGGED_REFUSALS,
    POLICY,
    TRY_LATER,
    BadRequest,
    ClientRefused,
    auth_message,
    nonneg_int,
    parse,
    peer,
    single_header,
)
from reactor.web.settings import FeedSettings

__all__ = ["RequestHandler", "Sessions"]

logger = logging.getLogger(__name__)


class RequestHandler(Protocol):
    """Answers the requests of a signed-in client besides ``auth`` (the dashboard's)."""

    @property
    def request_types(self) -> frozenset[str]: ...

    async def answer(self, principal: Principal, msg: Mapping[str, Any]) -> bytes: ...


@dataclass
class _Handshake:
    principal: Principal | None
    since: int | None


class Sessions:
    """Every feed connection's session (run each through :meth:`handler`)."""

    def __init__(self, settings: FeedSettings, store: FeedStore, fanout: FanOut, gate: Gate[Connection],
                 auth: Authenticator, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.fanout = fanout
        self.gate = gate
        self.auth = auth
        self.metrics = metrics
        self.requests: RequestHandler | None = None
        self._refusal_log = TokenBucket(rate=10.0, burst=50.0)  # refusals logged, at most
        self._refusals_unlogged = 0
        self._handshakes: weakref.WeakKeyDictionary[ServerConnection, _Handshake] = weakref.WeakKeyDictionary()
        self._snapshot_lock = anyio.Lock()
        self._snapshot_cache: tuple[float, int, bytes] | None = None
        fanout.on_reset = self.forget_snapshot

    def forget_snapshot(self) -> None:
        self._snapshot_cache = None

    # -- the handshake ---------------------------------------------------------------------------

    async def handshake(self, ws: ServerConnection, request: Request, query: str) -> Response | None:
        """Check a websocket handshake on the feed's path: None to go on, else the HTTP answer."""
        s = self.settings
        try:
            origin = single_header(request.headers, "Origin")
            header = single_header(request.headers, "Authorization")
            since: int | None = None
            values = parse_qs(query).get("since")
            if values:
                since = nonneg_int(values[0])
                if since is None:
                    raise BadRequest("since must be a whole number")
        except BadRequest as exc:
            self.refused(ws, 400, str(exc), "bad_request")
            return http_response(400, f"{exc}\n")
        if s.allowed_origins and origin is not None and origin not in s.allowed_origins:
            return http_response(403, "origin not allowed\n")
        if self.gate.full:
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
                self.refused(ws, 401, str(exc), "auth")
                return http_response(401, f"invalid token: {exc}\n",
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            if not isinstance(ws, Connection) or not self.gate.authenticate(ws):
                return http_response(503, "too many clients\n", headers={"Retry-After": "5"})
        self._handshakes[ws] = _Handshake(principal, since)
        return None

    def refused(self, ws: ServerConnection, code: int, reason: str, metric: str) -> None:
        """One log line for a client refused for what it sent (at most ~10 a second under a flood;
        the next line says how many were not logged)."""
        if not self._refusal_log.take(time.monotonic()):
            self._refusals_unlogged += 1
            return
        extra: dict[str, object] = {"code": code, "why": metric, "peer": peer(ws)}
        if self._refusals_unlogged:
            extra["unlogged_before"], self._refusals_unlogged = self._refusals_unlogged, 0
        logger.info("feed client refused: %s", reason, extra=extra)

    # -- one connection ------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        handshake = self._handshakes.pop(ws, None) or _Handshake(None, None)
        if self.settings.send_buffer_bytes is not None:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.send_buffer_bytes)
        client: Client | None = None
        try:
            principal, since = handshake.principal, handshake.since
            if principal is None:
                principal, first_since = await self._first_message(ws)
                since = first_since if first_since is not None else since
                if isinstance(ws, Connection) and not self.gate.authenticate(ws):
                    if ws.evicted:
                        raise ClientRefused(TRY_LATER, "too many unauthenticated connections", "unauthenticated")
                    raise ClientRefused(TRY_LATER, "too many clients", "too_many_clients")
            client = Client(ws, principal, bucket=TokenBucket(self.settings.request_rate,
                                                                 self.settings.request_burst))
            async with anyio.create_task_group() as tg:
                client.scope = tg.cancel_scope
                tg.start_soon(self._reader, client)
                tg.start_soon(self._expiry, client)
                tg.start_soon(self._session, client, since)
        except ClientRefused as exc:
            self.metrics.client_dropped(exc.metric)
            if exc.metric in LOGGED_REFUSALS:
                self.refused(ws, exc.code, exc.reason, exc.metric)
            await self._close(ws, exc.code, exc.reason)
            return
        except ConnectionClosed:
            return
        finally:
            if client is not None:
                self.fanout.unregister(client)
        if client.close_code is not None:
            if client.close_metric:
                self.metrics.client_dropped(client.close_metric)
            if client.close_metric in LOGGED_REFUSALS:
                self.refused(ws, client.close_code, client.close_reason, client.close_metric)
            await self._close(ws, client.close_code, client.close_reason)

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close with a code; a peer that does not read (and so cannot see it) is cut off."""
        with anyio.move_on_after(self.settings.close_timeout_s):
            await ws.close(code, reason)
        if ws.protocol.state is not State.CLOSED:
            ws.transport.abort()

    async def _first_message(self, ws: ServerConnection) -> tuple[Principal, int | None]:
        conn = ws if isinstance(ws, Connection) else None
        raw: str | bytes | None = None
        try:
            with anyio.fail_after(self.settings.auth_timeout_s), anyio.CancelScope() as scope:
                if conn is not None:
                    conn.auth_scope = scope
                    if conn.evicted:
                        scope.cancel()
                raw = await ws.recv()
        except TimeoutError:
            raise ClientRefused(POLICY, "authentication timeout: send {\"type\": \"auth\", \"token\": ...}",
                           "auth") from None
        finally:
            if conn is not None:
                conn.auth_scope = None
        if raw is None:  # pushed out by newer connections before it authenticated
            raise ClientRefused(TRY_LATER, "too many unauthenticated connections", "unauthenticated")
        token, since = auth_message(parse(raw))
        try:
            return await self.auth.authenticate(token), since
        except AuthError as exc:
            raise ClientRefused(POLICY, str(exc), "auth") from None

    async def _reader(self, c: Client) -> None:
        """What a client may send after authenticating: a fresh token for the same identity, or one of
        a request of the :class:`RequestHandler` plugged in (the dashboard's ``job``, ``status``, ``action``),
        ``request_rate`` a second (bursts of ``request_burst``)."""
        try:
            async for raw in c.ws:
                if not c.bucket.take(time.monotonic()):
                    c.close(POLICY, "too many requests", "rate_limited")
                    return
                try:
                    msg = parse(raw)
                except ClientRefused as exc:
                    c.close(exc.code, exc.reason, exc.metric)
                    return
                requests = self.requests
                if requests is not None and msg.get("type") in requests.request_types:  # the dashboard's
                    await c.ws.send(await requests.answer(c.principal, msg), text=True)
                    continue
                if msg.get("type") != "auth":
                    c.close(POLICY, f"unknown message type {str(msg.get('type'))[:32]!r}", "bad_message")
                    return
                token = msg.get("token")
                if not isinstance(token, str) or not token:
                    c.close(POLICY, "malformed message: token must be a string", "bad_message")
                    return
                try:
                    principal = await self.auth.authenticate(token)
                except AuthError as exc:
                    c.close(POLICY, str(exc), "auth")
                    return
                if not principal.same_identity(c.principal):
                    c.close(POLICY, "token is for someone else", "auth")
                    return
                c.principal = principal
        except ConnectionClosed:
            pass
        c.close(None)

    async def _expiry(self, c: Client) -> None:
        while True:
            expires = c.principal.expires_at
            await anyio.sleep(max(0.0, expires + self.settings.auth.leeway_s - time.time()))
            if c.principal.expires_at == expires:
                c.close(POLICY, "token expired", "token_expired")
                return

    async def _session(self, c: Client, since: int | None) -> None:
        try:
            await self._start(c, since)
            while True:
                await self._catch_up(c)
                await c.wake.wait()
                c.wake = anyio.Event()
        except ConnectionClosed:
            c.close(None)
        except DatabaseError as exc:
            logger.warning("feed client dropped: database unavailable: %s", exc)
            c.close(TRY_LATER, "database unavailable, try again", "database")
        except Exception:
            logger.exception("feed session failed")
            c.close(INTERNAL, "internal error", "error")

    async def _start(self, c: Client, since: int | None) -> None:
        """Snapshot or resume, then hand the client to the pump (its own task catches up first)."""
        if since is None:
            await self._send_snapshot(c)
        else:
            [b] = await self.store.rows("feed_bounds")
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
                await c.ws.send(wire.dumps({"type": "resync", "reason": reason}), text=True)
                await self._send_snapshot(c, fresh=True)
            else:
                await c.ws.send(wire.dumps({"type": "resumed", "since": since}), text=True)
                c.cursor = since
                if c.user_id is not None and not c.admin:
                    rows = await self.store.rows(
                        "feed_user_queue", {"user_id": c.user_id, "limit": self.settings.snapshot_queue})
                    for r in rows:
                        c.queued[r["id"]] = r["queue_position"]
                        c.pending_positions[r["id"]] = r["queue_position"]
        self.fanout.register(c)
        if since is not None and c.admin:
            self.fanout.wake_stats()  # a snapshot carries the figures; a resume gets them after its events

    async def _send_snapshot(self, c: Client, *, fresh: bool = False) -> None:
        if c.admin:
            seq, payload = await self._admin_snapshot(fresh)
        else:
            snap = await self.store.snapshot(c.user_id, self.settings.snapshot_jobs, self.settings.snapshot_queue)
            seq = snap["seq"]
            payload = _snapshot_message(snap)
            c.queued = {j["id"]: j["queue_position"] for j in snap["queue"]}
        await c.ws.send(payload, text=True)
        c.cursor = seq

    async def _admin_snapshot(self, fresh: bool) -> tuple[int, bytes]:
        """One admin snapshot for everyone who asks within ``snapshot_cache_s`` (while the ring still
        holds the events after it, so nobody catching up from it needs the database)."""
        async with self._snapshot_lock:
            cached = self._snapshot_cache
            if (not fresh and cached is not None and cached[1] >= self.fanout.ring.base
                    and time.monotonic() - cached[0] < self.settings.snapshot_cache_s):
                return cached[1], cached[2]
            snap = await self.store.snapshot(None, self.settings.snapshot_jobs, self.settings.snapshot_queue)
            payload = _snapshot_message(snap)
            self._snapshot_cache = (time.monotonic(), snap["seq"], payload)
            return snap["seq"], payload

    # -- a client's own task: catching up, and whenever its output backs up --------------------

    async def _catch_up(self, c: Client) -> None:
        ring = self.fanout.ring
        while True:
            if c.resync is not None:
                reason, c.resync = c.resync, None
                c.pending_positions.clear()
                await c.ws.send(wire.dumps({"type": "resync", "reason": reason}), text=True)
                await self._send_snapshot(c, fresh=True)
                c.catchup_until = max(c.cursor, ring.last)
                continue
            nxt = c.cursor + 1
            if nxt <= ring.last:
                entry = ring.get(nxt)
                if entry is None:  # no longer in memory
                    if c.cursor >= c.catchup_until:
                        c.close(TRY_LATER, "too slow", "too_slow")
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
                await c.ws.send(wire.position(job_id, position), text=True)
                continue
            if c.pending_heartbeat:
                c.pending_heartbeat = False
                await c.ws.send(wire.heartbeat(c.cursor), text=True)
                continue
            c.lagging = False  # caught up and drained: the pump writes from here on
            return

    async def _replay(self, c: Client, upto: int) -> None:
        """Events (cursor, upto] from the database, in chunks, with backpressure."""
        upto = max(upto, c.cursor)
        rows = await self.store.rows("feed_events", {
            "after": c.cursor, "upto": upto, "limit": READ_CHUNK,
            "user_id": None if c.admin else c.user_id,
        })
        user = c.user_id is not None and not c.admin
        moved = False
        for row in rows:
            entry = wire.entry(row)
            payload = c.payload(entry)
            c.cursor = entry.seq
            if user and wire.moves_queue(row):
                # its queued jobs, as the pump tracks them from the events it reads: these it did not
                # read for this client (before it connected, or while nobody was connected)
                track_queue(c, row)
                moved = True
            if payload is not None:
                await c.ws.send(payload, text=True)
        if moved:
            self.fanout.wake_positions()
        if len(rows) < READ_CHUNK:
            c.cursor = max(c.cursor, upto)


def _snapshot_message(snap: Mapping[str, Any]) -> bytes:
    """``snapshot`` ``{seq, stats, jobs, queue}`` from :meth:`FeedStore.snapshot`'s rows."""
    return wire.dumps({"type": "snapshot", "seq": snap["seq"], "stats": snap["stats"],
                       "jobs": [wire.job_json(r) for r in snap["jobs"]],
                       "queue": [wire.job_json(r) for r in snap["queue"]]})
