"""The admin dashboard: a static page at ``/`` and the requests it sends over the feed.

The page (``reactor/web/static/``: ``index.html``, ``app.js``, ``app.css``; no build step, nothing loaded
from elsewhere) is served by the feed's port through :func:`static_routes`. It signs in with the
feed's ``auth`` message and then sends, on the same websocket, the requests answered here
(:class:`Requests`); each may carry a ``request_id`` (a short string or a number), echoed back:

* ``{"type": "job", "id": ID}`` -> ``{"type": "job", "job": {...}, "events": [...]}``: the job
  (payload, result, error fields) and its history, for admins and for the job's owner (anyone else:
  ``{"type": "job", "id": ID, "error": "not found"}``, so a job's existence is not revealed);
* ``{"type": "status"}`` (admins) -> ``{"type": "status", "alerts": [...], "circuits": [...],
  "config": {...}, "pause": {...} | null, "stats": {...}}``: the alerts firing, the live reactors
  whose circuit is not closed, the limits as configured, who paused dispatch, and
  ``get_queue_stats()`` now (the feed pushes stats only after events: a page that resumed, or that
  sat through a quiet hour, reads them here);
* ``{"type": "action", "action": "cancel" | "retry" | "pause" | "resume" | "set_limits", "id"?,
  "values"?}`` -> ``{"type": "action_result", "ok": bool, "error"?}``: admins only (anyone else gets
  ``ok: false, error: "forbidden"`` and nothing changes). The actions are the runbook's own
  (:mod:`reactor.ops.runbook`), each in one transaction that records ``admin:<sub>`` in ``job_events.actor``.

Admins also get ``{"type": "alert", ...}`` (a ``NOTIFY reactor_alerts`` payload) and
``{"type": "circuit", "reactor", "circuit", "since"}`` (``NOTIFY reactor_fleet``) as they happen:
see :func:`notice_message`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from functools import partial
from http import HTTPStatus
from importlib import resources
from typing import Any
from uuid import UUID

import anyio
import anyio.to_thread
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from reactor.core.errors import ReactorError
from reactor.core.models import parse_uuid
from reactor.db.sqlfiles import load_queries
from reactor.engine.listener import Notice
from reactor.ops import runbook as ops
from reactor.web.auth import Principal

__all__ = [
    "ACTIONS",
    "LIMIT_KEYS",
    "REQUEST_TYPES",
    "STATIC_FILES",
    "Requests",
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


def _response(status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> Response:
    h = Headers([
        ("Content-Type", content_type), ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"), ("Connection", "close"),
    ])
    for k, v in (headers or {}).items():
        h[k] = v
    code = HTTPStatus(status)
    return Response(code.value, code.phrase, h, body)


def static_routes() -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """The feed's HTTP routes for the page: its files, read once, now (they ship in the package)."""
    folder = resources.files("reactor.web") / "static"
    routes: dict[str, Callable[[Request], Awaitable[Response]]] = {}
    for path, name in STATIC_FILES.items():
        body = (folder / name).read_bytes()
        content_type = _CONTENT_TYPES[name[name.rfind("."):]]
        headers = {
            "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
        }

        async def serve(request: Request, body: bytes = body, content_type: str = content_type,
                        headers: dict[str, str] = headers) -> Response:
            return _response(200, body, content_type, headers)

        routes[path] = serve
    return routes


# -- wire format ----------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":"), ensure_ascii=False).encode()


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


def _request_id(value: object) -> str | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) < 2**53:
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    return None



# -- requests -------------------------------------------------------------------------------------

_STATUS_SQL = {
    "alerts": """
        SELECT name AS alert, 'firing' AS status, value, threshold, since, changed_by AS reactor
          FROM reactor.alerts WHERE firing ORDER BY since, name""",
    "circuits": """
        SELECT id AS reactor, circuit_state AS circuit, circuit_since AS since
          FROM reactor.reactors
         WHERE circuit_state <> 'closed' AND heartbeat_at >= now() - interval '90 seconds'
         ORDER BY circuit_since NULLS LAST, id""",
    "config": """
        SELECT max_concurrent_renders, max_manim_renders, peak_hour_start, peak_hour_end,
               peak_worker_multiplier, timezone, job_timeout_minutes
          FROM public.job_queue_config""",
    "pause": """
        SELECT max_concurrent_renders AS previous, paused_at, paused_by FROM reactor.paused_limits""",
    "stats": "SELECT * FROM public.get_queue_stats()",
}


class _Failed(Exception):
    """The request is answered with this error."""


class Requests:
    """Answers a signed-in client's ``job``, ``status`` and ``action`` messages.

    Reads go through the feed's pool; actions run :mod:`reactor.ops.runbook` on a connection of their own in
    a worker thread (they are rare, and each is one short transaction with a lock timeout).
    """

    def __init__(self, dsn: str, pool: AsyncConnectionPool, *, timeout_s: float = 10.0,
                 max_concurrent: int = 2) -> None:
        self.dsn = dsn
        self.pool = pool
        self.timeout_s = timeout_s
        self._ops = load_queries("ops.sql")
        # each client's requests run one at a time; across clients, at most this many hold one of the
        # feed's connections (the rest stay free for snapshots and catch-up reads), and as many
        # actions run at once
        self._reads = anyio.Semaphore(max_concurrent)
        self._actions = anyio.CapacityLimiter(max_concurrent)

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
        except (TimeoutError, PoolTimeout):
            body = {"error": "the database did not answer in time"}
        except psycopg.Error as exc:
            logger.warning("dashboard request failed: %s", " ".join(str(exc).split())[:200])
            body = {"error": "database unavailable"}
        if kind == "action":
            body.setdefault("ok", "error" not in body)
        out: dict[str, Any] = {"type": reply_type, **body}
        rid = _request_id(msg.get("request_id"))
        if rid is not None:
            out["request_id"] = rid
        return dumps(out)

    async def _rows(self, statements: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Several reads in one read-only transaction."""
        out: dict[str, list[dict[str, Any]]] = {}
        with anyio.fail_after(self.timeout_s):
            async with self._reads, self.pool.connection(timeout=self.timeout_s) as conn, conn.transaction(), \
                    conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SET TRANSACTION READ ONLY")
                for name, statement in statements.items():
                    await cur.execute(statement, params)
                    out[name] = await cur.fetchall()
        return out

    async def _job(self, principal: Principal, msg: Mapping[str, Any]) -> dict[str, Any]:
        job_id = parse_uuid(msg.get("id"))
        if job_id is None:
            raise _Failed("id must be a job id (a uuid)")
        got = await self._rows({"job": self._ops["get_job"], "events": self._ops["job_events"]}, {"id": job_id})
        if not got["job"] or not principal.may_see(got["job"][0]["user_id"]):
            return {"id": str(job_id), "error": "not found"}
        events = got["events"]
        if not principal.admin:
            events = [{k: v for k, v in e.items() if k != "actor"} for e in events]
        return {"job": got["job"][0], "events": events}

    async def _status(self, principal: Principal) -> dict[str, Any]:
        if not principal.admin:
            raise _Failed("forbidden")
        got = await self._rows(_STATUS_SQL, {})
        return {
            "alerts": got["alerts"], "circuits": got["circuits"],
            "config": got["config"][0] if got["config"] else None,
            "pause": got["pause"][0] if got["pause"] else None,
            "stats": got["stats"][0] if got["stats"] else None,
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
        result = await anyio.to_thread.run_sync(partial(self._run, str(action), job_id, values, actor),
                                                limiter=self._actions)
        logger.info("dashboard action", extra={"action": action, "job_id": job_id, "actor": actor,
                                               "ok": "error" not in result})
        return result

    def _run(self, action: str, job_id: UUID | None, values: dict[str, str], actor: str) -> dict[str, Any]:
        """One runbook operation, in a worker thread (blocking psycopg, as the CLI uses it)."""
        ms = int(self.timeout_s * 1000)
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=max(1, int(self.timeout_s)),
                application_name="reactor dashboard",
                options=f"-c lock_timeout={ms // 2} -c statement_timeout={ms}",
            )
        except psycopg.Error as exc:
            logger.warning("dashboard action: cannot connect: %s", " ".join(str(exc).split())[:200])
            return {"error": "database unavailable"}
        try:
            with conn:
                if action == "cancel":
                    assert job_id is not None
                    cancelled = ops.cancel_job(conn, job_id, actor=actor)
                    return {"job": _brief(cancelled.job), "changed": cancelled.changed}
                if action == "retry":
                    assert job_id is not None
                    return {"job": _brief(ops.retry_job(conn, job_id, actor=actor)), "changed": True}
                if action == "pause":
                    paused = ops.pause(conn, actor=actor)
                    return {"changed": paused.changed}
                if action == "resume":
                    resumed = ops.resume(conn, actor=actor)
                    return {"changed": resumed.changed, "max_concurrent_renders": resumed.max_concurrent_renders}
                config = ops.config_set(conn, values, actor=actor)
                return {"changed": True, "config": {k: config.get(k) for k in LIMIT_KEYS}}
        except ReactorError as exc:  # refused (unknown job, wrong status) or a bad value: the reason
            return {"error": str(exc)}


def _brief(job: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": job["id"], "status": job["status"]}


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
