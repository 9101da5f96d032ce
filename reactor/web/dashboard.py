"""The admin dashboard: a static page at ``/`` and the requests it sends over the feed.

The page (``reactor/web/static/``: ``index.html``, ``app.js``, ``app.css``; no build step, nothing
loaded from elsewhere) is served by the feed's port through :func:`static_routes`. It signs in with
the feed's ``auth`` message and then sends, on the same websocket, the requests answered here
(:class:`Dashboard`, which the service plugs into the feed); each may carry a ``request_id`` (a
short string or a number), echoed back:

* ``{"type": "job", "id": ID}`` -> ``{"type": "job", "job": {...}, "events": [...]}``: the job
  (payload, result, error fields) and its history, for admins and for the job's owner (anyone else:
  ``{"type": "job", "id": ID, "error": "not found"}``, so a job's existence is not revealed);
* ``{"type": "status"}`` (admins) -> ``{"type": "status", "alerts": [...], "circuits": [...],
  "config": {...}, "pause": {...} | null, "stats": {...}, "schedules": [...]}``: the alerts firing,
  the live reactors whose circuit is not closed, the limits as configured, who paused dispatch,
  the schedules with their next runs (the next first), and ``get_queue_stats()`` now (the feed
  pushes stats only after events: a page that resumed, or that sat through a quiet hour, reads
  them here);
* ``{"type": "action", "action": "cancel" | "retry" | "pause" | "resume" | "set_limits", "id"?,
  "values"?}`` -> ``{"type": "action_result", "ok": bool, "error"?}``: admins only (anyone else gets
  ``ok: false, error: "forbidden"`` and nothing changes). The actions are the runbook's own, given
  to the dashboard by the service (:class:`Actions`, provided by reactor/ops/actions.py: the web
  layer does not import ops), each in one transaction that records ``admin:<sub>`` in
  ``job_events.actor``.

Admins also get ``{"type": "alert", ...}`` (a ``NOTIFY reactor_alerts`` payload) and
``{"type": "circuit", "reactor", "circuit", "since"}`` (``NOTIFY reactor_fleet``) as they happen:
see :func:`notice_message`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from importlib import resources
from typing import Any, Protocol
from uuid import UUID

import anyio
import anyio.to_thread
from websockets.http11 import Request, Response

from reactor.core.errors import DatabaseError, DatabaseTimeout, ReactorError
from reactor.core.models import parse_uuid
from reactor.core.notice import Notice
from reactor.db.feed import FeedStore
from reactor.web.auth import Principal
from reactor.web.http import HttpHandler, http_response
from reactor.web.wire import dumps

__all__ = [
    "ACTIONS",
    "LIMIT_KEYS",
    "REQUEST_TYPES",
    "STATIC_FILES",
    "Actions",
    "Dashboard",
    "actor_of",
    "notice_message",
    "static_routes",
]

logger = logging.getLogger(__name__)

#: message types a signed-in client may send besides ``auth``
REQUEST_TYPES = frozenset({"job", "status", "action"})
ACTIONS = ("cancel", "retry", "pause", "resume", "set_limits")
#: the settings ``set_limits`` may change
LIMIT_KEYS = ("max_concurrent_renders", "max_manim_renders")
_MAX_LIMIT = 100_000

# -- static files ---------------------------------------------------------------------------------

#: URL path -> file in reactor/web/static
STATIC_FILES = {
    "/": "index.html",
    "/static/app.js": "app.js",
    "/static/app.css": "app.css",
}
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
#: the page loads nothing but its own files and talks only to its own origin (the feed)
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def static_routes() -> dict[str, HttpHandler]:
    """The feed's HTTP routes for the page: its files, read once, now (they ship in the package)."""
    folder = resources.files("reactor.web") / "static"
    routes: dict[str, HttpHandler] = {}
    for path, name in STATIC_FILES.items():
        body = (folder / name).read_bytes()
        content_type = _CONTENT_TYPES[name[name.rfind("."):]]
        headers = {
            "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
        }

        async def serve(request: Request, body: bytes = body, content_type: str = content_type,
                        headers: dict[str, str] = headers) -> Response:
            return http_response(200, body, content_type, headers, cache_control="no-cache")

        routes[path] = serve
    return routes


# -- wire format ----------------------------------------------------------------------------------

_ALERT_FIELDS: tuple[str, ...] = ("alert", "status", "value", "threshold", "since", "reactor", "summary")
_CIRCUIT_FIELDS: tuple[str, ...] = ("reactor", "circuit", "since")


def notice_message(notice: Notice) -> bytes | None:
    """What admins are sent for a NOTIFY on ``reactor_alerts`` or ``reactor_fleet`` (None: nothing)."""
    if notice.channel == "reactor_alerts":
        kind, fields = "alert", _ALERT_FIELDS
    elif notice.channel == "reactor_fleet":
        kind, fields = "circuit", _CIRCUIT_FIELDS
    else:
        return None
    return dumps({"type": kind, **{k: notice.payload.get(k) for k in fields}})


def actor_of(principal: Principal) -> str:
    """``job_events.actor`` of a change made from the dashboard: ``admin:<sub>``."""
    return f"admin:{principal.user_id if principal.user_id is not None else principal.role}"


def request_id(value: object) -> str | int | None:
    """The ``request_id`` a request carries, echoed back: a short string or a number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) < 2**53:
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    return None


# -- requests -------------------------------------------------------------------------------------


class Actions(Protocol):
    """The runbook operations an admin may run from the dashboard (reactor/ops/actions.py).

    Blocking: the dashboard runs each in a worker thread. The answer is the reply's body:
    ``{"error": reason}`` when the database refused it or could not be reached.
    """

    def run(self, action: str, job_id: UUID | None, values: Mapping[str, str], actor: str) -> dict[str, Any]: ...


class _Failed(ReactorError):
    """The request is answered with this error."""


class Dashboard:
    """The admin dashboard, plugged into the feed by the service: the page's routes, the answers to
    a signed-in client's ``job``, ``status`` and ``action`` messages, and alert and circuit messages.

    Reads go through the feed's pool; actions run on a connection of their own in a worker thread
    (they are rare, and each is one short transaction with a lock timeout).
    """

    request_types = REQUEST_TYPES

    def __init__(self, store: FeedStore, actions: Actions, *, timeout_s: float = 10.0,
                 max_concurrent: int = 2) -> None:
        self.store = store
        self.actions = actions
        self.timeout_s = timeout_s
        self.routes = static_routes()
        # each client's requests run one at a time; across clients, at most this many hold one of the
        # feed's connections (the rest stay free for snapshots and catch-up reads), and as many
        # actions run at once
        self._reads = anyio.Semaphore(max_concurrent)
        self._actions = anyio.CapacityLimiter(max_concurrent)

    def notice_message(self, notice: Notice) -> bytes | None:
        return notice_message(notice)

    async def answer(self, principal: Principal, msg: Mapping[str, Any]) -> bytes:
        """The reply to one request (never raises for a bad request or an unavailable database)."""
        kind = msg.get("type")
        reply_type = "action_result" if kind == "action" else str(kind)
        body: dict[str, Any]
        try:
            if kind == "job":
                body = await self._job(principal, msg)
            elif kind == "status":
                body = await self._status(principal)
            elif kind == "action":
                body = await self._action(principal, msg)
            else:
                raise _Failed(f"unknown request {str(kind)[:32]!r}")
        except _Failed as exc:
            body = {"error": str(exc)}
        except (TimeoutError, DatabaseTimeout):
            body = {"error": "the database did not answer in time"}
        except DatabaseError as exc:
            logger.warning("dashboard request failed: %s", " ".join(str(exc).split())[:200])
            body = {"error": "database unavailable"}
        if kind == "action":
            body.setdefault("ok", "error" not in body)
        out: dict[str, Any] = {"type": reply_type, **body}
        rid = request_id(msg.get("request_id"))
        if rid is not None:
            out["request_id"] = rid
        return dumps(out)

    async def _job(self, principal: Principal, msg: Mapping[str, Any]) -> dict[str, Any]:
        job_id = parse_uuid(msg.get("id"))
        if job_id is None:
            raise _Failed("id must be a job id (a uuid)")
        with anyio.fail_after(self.timeout_s):
            async with self._reads:
                got = await self.store.job_and_events(job_id, self.timeout_s)
        if not got["job"] or not principal.may_see(got["job"][0]["user_id"]):
            return {"id": str(job_id), "error": "not found"}
        events = got["events"]
        if not principal.admin:
            events = [{k: v for k, v in e.items() if k != "actor"} for e in events]
        return {"job": got["job"][0], "events": events}

    async def _status(self, principal: Principal) -> dict[str, Any]:
        if not principal.admin:
            raise _Failed("forbidden")
        with anyio.fail_after(self.timeout_s):
            async with self._reads:
                got = await self.store.status(self.timeout_s)
        return {
            "alerts": got["alerts"], "circuits": got["circuits"],
            "config": got["config"][0] if got["config"] else None,
            "pause": got["pause"][0] if got["pause"] else None,
            "stats": got["stats"][0] if got["stats"] else None,
            "schedules": got["schedules"],
        }

    async def _action(self, principal: Principal, msg: Mapping[str, Any]) -> dict[str, Any]:
        action = msg.get("action")
        if action not in ACTIONS:
            raise _Failed(f"action must be one of {', '.join(ACTIONS)}")
        if not principal.admin:
            logger.warning("dashboard action refused: not an admin",
                           extra={"action": action, "user_id": principal.user_id})
            raise _Failed("forbidden")
        job_id: UUID | None = None
        values: dict[str, str] = {}
        if action in ("cancel", "retry"):
            job_id = parse_uuid(msg.get("id"))
            if job_id is None:
                raise _Failed("id must be a job id (a uuid)")
        if action == "set_limits":
            values = _limits(msg.get("values"))
        actor = actor_of(principal)
        result = await anyio.to_thread.run_sync(partial(self.actions.run, str(action), job_id, values, actor),
                                                limiter=self._actions)
        if action == "set_limits" and isinstance(result.get("config"), dict):
            result["config"] = {k: result["config"].get(k) for k in LIMIT_KEYS}
        logger.info("dashboard action", extra={"action": action, "job_id": job_id, "actor": actor,
                                               "ok": "error" not in result})
        return result


def _limits(values: object) -> dict[str, str]:
    if not isinstance(values, dict) or not values:
        raise _Failed(f"values must be an object with {' and/or '.join(LIMIT_KEYS)}")
    out: dict[str, str] = {}
    for key, value in values.items():
        if key not in LIMIT_KEYS:
            raise _Failed(f"{str(key)[:40]} cannot be changed here; only {', '.join(LIMIT_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_LIMIT:
            raise _Failed(f"{key} must be a whole number from 0 to {_MAX_LIMIT}")
        out[key] = str(value)
    return out
