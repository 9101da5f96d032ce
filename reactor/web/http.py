"""Plain HTTP on the feed's port: the one response builder, and the probes.

Every path but the feed's is answered through websockets' ``process_request`` hook from a route
table (:attr:`reactor.web.feed.Feed.routes`); each answer closes its connection. The probes:

* ``/livez``: 200 while the process serves (it checks nothing outside it);
* ``/readyz``: 200 when the database answers, the LISTEN connection is up, every required part runs
  and the reactor is not stopping; else 503, naming what is wrong (passwords redacted);
* ``/metrics``: Prometheus exposition, with the database's figures read at scrape time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import anyio
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from reactor.core.errors import DatabaseError
from reactor.core.logs import redact
from reactor.db.feed import FeedStore
from reactor.web.metrics import CONTENT_TYPE, Metrics
from reactor.web.wire import dumps

__all__ = ["HttpHandler", "Probes", "http_response", "json_response"]

#: an HTTP route: the parsed request in, a response out
HttpHandler = Callable[[Request], Awaitable[Response]]


def http_response(
    status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
    headers: Mapping[str, str] | None = None, *, cache_control: str = "no-store",
) -> Response:
    """A complete HTTP response for a route (the connection is closed after it)."""
    data = body.encode() if isinstance(body, str) else body
    h = Headers([
        ("Content-Type", content_type), ("Content-Length", str(len(data))),
        ("Cache-Control", cache_control), ("Connection", "close"),
    ])
    for k, v in (headers or {}).items():
        h[k] = v
    code = HTTPStatus(status)
    return Response(code.value, code.phrase, h, data)


def json_response(status: int, body: Mapping[str, Any]) -> Response:
    return http_response(status, dumps(body), "application/json")


class Probes:
    """``/livez``, ``/readyz`` and ``/metrics`` of one reactor."""

    def __init__(
        self,
        store: FeedStore,
        metrics: Metrics,
        *,
        listener_connected: Callable[[], bool],
        stopping: Callable[[], bool],
        parts: Callable[[], tuple[bool, Mapping[str, str]]],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._listener_connected = listener_connected
        self._stopping = stopping
        self._parts = parts  # (every required part runs, each part's state): reactor/engine/supervise.py

    def routes(self) -> dict[str, HttpHandler]:
        return {"/livez": self.livez, "/readyz": self.readyz, "/metrics": self.metrics}

    async def livez(self, request: Request) -> Response:
        return http_response(200, "ok\n")

    async def readyz(self, request: Request) -> Response:
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
        return json_response(200 if ready else 503, body)

    async def metrics(self, request: Request) -> Response:
        row: dict[str, Any] | None = None
        try:
            with anyio.fail_after(2.0):
                rows = await self._store.rows("feed_metrics", wait_s=2.0)
            row = rows[0] if rows else None
        except (DatabaseError, TimeoutError):
            row = None
        self._metrics.update_database(row)
        return http_response(200, self._metrics.exposition(), CONTENT_TYPE)
