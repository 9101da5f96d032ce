"""The live feed: job events over a websocket, and the HTTP probes, on one port.

``GET /feed`` is the websocket; every other path is plain HTTP answered through websockets'
``process_request`` hook from :attr:`Feed.routes` (``/livez``, ``/readyz``, ``/metrics``; unknown
paths get 404). The service plugs the admin dashboard in (:meth:`Feed.plug`): its page's routes,
its requests on the websocket, and what admins are sent for an alert or a circuit change.

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

The rooms of the feed: reactor/web/settings.py (its settings), http.py (the response builder and
the probes), protocol.py (what clients may send), gate.py (who holds connections), session.py (one
connection from handshake to close), fanout.py (events from the database to every client),
wire.py (what is sent), and reactor/db/feed.py (its own small pool). Nothing waits on a slow client
but that client.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import anyio
from anyio.abc import TaskStatus
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from reactor.core.logs import add_secret, dsn_secrets
from reactor.core.notice import LOG_CHANNEL, Notice
from reactor.db.feed import FeedStore
from reactor.web.auth import Authenticator, load_jwks
from reactor.web.fanout import FanOut
from reactor.web.gate import Connection, Gate, connection_class
from reactor.web.http import HttpHandler, Probes, http_response
from reactor.web.metrics import Metrics
from reactor.web.session import RequestHandler, Sessions
from reactor.web.settings import FeedSettings, tls_context

__all__ = ["FEED_PATH", "Feed", "FeedSettings", "HttpHandler", "Plugin", "http_response", "tls_context"]

logger = logging.getLogger(__name__)

FEED_PATH = "/feed"


class Plugin(RequestHandler, Protocol):
    """What the service plugs into the feed (the admin dashboard, reactor/web/dashboard.py)."""

    @property
    def routes(self) -> Mapping[str, HttpHandler]: ...

    def notice_message(self, notice: Notice) -> bytes | None:
        """What admins are sent now for this notification (None: nothing)."""
        ...


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
        self.store = FeedStore(dsn, settings.pool_size)
        probes = Probes(self.store, self.metrics, listener_connected=listener_connected, stopping=stopping,
                        parts=parts)
        self.routes: dict[str, HttpHandler] = probes.routes()
        self.port: int | None = None
        self._server: Server | None = None
        self._gate: Gate[Connection] = Gate(settings.max_clients, settings.unauthenticated_limit)
        self._fanout = FanOut(settings, self.store, self.metrics)
        self._sessions = Sessions(settings, self.store, self._fanout, self._gate, self.auth, self.metrics)
        self._plugin: Plugin | None = None

    def plug(self, plugin: Plugin) -> None:
        """Serve ``plugin``'s routes, answer its requests, send admins its notice messages."""
        self._plugin = plugin
        self.routes.update(plugin.routes)
        self._sessions.requests = plugin

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.tls_cert else "ws"
        return f"{scheme}://{self.settings.host}:{self.port}{FEED_PATH}"

    @property
    def clients(self) -> int:
        """Authenticated clients connected now."""
        return len(self._fanout.clients)

    @property
    def unauthenticated(self) -> int:
        """Connections open now that have not (yet) authenticated."""
        return self._gate.unauthenticated

    @property
    def last_seq(self) -> int:
        """The last event seq the feed has read."""
        return self._fanout.ring.last

    # -- wake-ups from the listener ------------------------------------------------------------

    def on_notice(self, notice: Notice) -> None:
        if self._plugin is not None:
            forward = self._plugin.notice_message(notice)  # alerts and circuit changes: to admins, now
            if forward is not None:
                self._fanout.to_admins(forward)
                return
        if notice.channel == "reactor_config":
            self._fanout.wake_stats()
            return
        if notice.channel not in ("reactor_events", LOG_CHANNEL):
            return  # alerts, circuits, due times, schedules: not job events, nothing to read
        if notice.truncated:
            self._fanout.resync_all("jobs were truncated")
            return
        if notice.seq is None or notice.seq > self._fanout.ring.last:
            self._fanout.wake_pump()

    def on_connect(self) -> None:
        """The listener (re)connected: read whatever was committed meanwhile."""
        self._fanout.recheck()

    def wake(self) -> None:
        """Events may have been committed that no notice will announce to this feed (this reactor's
        own cycles, or those before the listener followed ``reactor_log``): read the log."""
        self._fanout.wake_pump()

    @property
    def on_clients(self) -> Callable[[bool], None]:
        """Called with True when the first client registers, False when the last one leaves (and at
        start): the service has the listener follow ``reactor_log`` while there are clients."""
        return self._fanout.on_clients

    @on_clients.setter
    def on_clients(self, hook: Callable[[bool], None]) -> None:
        self._fanout.on_clients = hook

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started()`` once the port is bound."""
        s = self.settings
        await self.store.open()
        server: Server | None = None
        try:
            [bounds] = await self.store.rows("feed_bounds")
            self._fanout.follow_from(int(bounds["last_seq"]))
            tls = tls_context(s.tls_cert, s.tls_key)
            if tls is None and not _loopback(s.host):
                logger.warning(
                    "serving plain HTTP on %s: tokens and job data travel unencrypted; use --tls-cert and "
                    "--tls-key, or terminate TLS in a reverse proxy (deploy/nginx-reactor.conf)", s.host)
            server = await serve(
                self._sessions.handler, s.host, s.port, ssl=tls,
                process_request=self._process_request, create_connection=connection_class(self._gate),
                compression=None,  # frames are written once for all clients; deflate is per client
                max_size=s.max_message_bytes, max_queue=4, write_limit=s.write_buffer_bytes,
                ping_interval=s.ping_interval_s, ping_timeout=s.ping_timeout_s,
                close_timeout=s.close_timeout_s, server_header="reactor",
            )
            self._server = server
            self.port = int(server.sockets[0].getsockname()[1])
            logger.info("feed listening", extra={"url": self.url})
            async with anyio.create_task_group() as tg:
                self._fanout.start(tg)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                if server is not None:
                    server.close()  # clients get 1001 (going away) and resume elsewhere
                    with anyio.move_on_after(s.close_timeout_s + 1):
                        await server.wait_closed()
                await self.store.close()

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Routing: the feed's path goes to the websocket handshake, any other to its route (or 404)."""
        path, _, query = request.path.partition("?")
        if path != FEED_PATH:
            route = self.routes.get(path)
            if route is None:
                return http_response(404, "not found\n")
            return await route(request)
        return await self._sessions.handshake(ws, request, query)
