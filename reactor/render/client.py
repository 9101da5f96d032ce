"""The orchestrator client: one ``POST /render`` per attempt, failures mapped to categories.

HTTP/1.1 over asyncio, kept-alive connections, responses parsed by httptools (llhttp, the parser
of Node.js and uvicorn): status, headers, ``Content-Length`` and chunked bodies, keep-alive. The
render call is the last step of every pickup, and on this project's 2-core benchmark machine a
general-purpose client cost a measurable share of it: aiohttp added about 0.25 ms to each
pickup (commit to the orchestrator receiving the request) over writing the request on a
connection ourselves, and httpx spent about 1.9 ms of CPU per request. The request is one
``POST`` with a JSON body, so writing it is a few lines; reading the answer is httptools' job.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from datetime import UTC, datetime
from typing import cast
from urllib.parse import unquote, urlsplit

import anyio
import httptools
from pydantic import ValidationError

from reactor.core.errors import ReactorError, RenderError
from reactor.core.models import RenderRequest, RenderResult
from reactor.core.policy import category_for_status, parse_retry_after

__all__ = ["RenderClient"]

logger = logging.getLogger(__name__)

BODY_EXCERPT = 500
#: an answer larger than this is not a render result: the call fails (UNKNOWN), the connection closes
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class _Dropped(ReactorError):
    """The connection ended before the whole answer came."""


class _Malformed(ReactorError):
    """The answer is not HTTP we can read (or is too large)."""


class _Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to the orchestrator, one exchange at a time.

    ``exchange`` writes a request and waits for the whole answer. The connection can be used again
    when the answer came complete and both sides keep it alive; any failure or cancellation
    aborts it, so the orchestrator sees the disconnect at once (that is how a render is cancelled).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[_Answer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, same methods

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.abort()  # bytes nobody asked for: the connection is out of step
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(_Malformed(f"not an HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._headers_done and "content-length" not in self._headers and \
                    "chunked" not in self._headers.get("transfer-encoding", "").lower():
                # a body delimited by the end of the connection (HTTP/1.0 style) is complete now
                waiter.set_result(self._answer())
            else:
                self._fail(_Dropped("connection closed before the whole answer came"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(_Dropped(f"connection lost: {exc!r}" if exc else "connection closed"))

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(_Malformed(f"answer larger than {MAX_ANSWER_BYTES} bytes"))
            self.abort()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            self._start_answer()  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return
        self._keep_alive = self._parser.should_keep_alive()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._answer())

    # -- use ---------------------------------------------------------------------------------------

    def _start_answer(self) -> None:
        self._headers, self._body, self._size = {}, [], 0
        self._headers_done = self._keep_alive = False

    def _answer(self) -> _Answer:
        return _Answer(self._parser.get_status_code(), self._headers, b"".join(self._body))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    @property
    def reusable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, request: bytes) -> _Answer:
        assert self.transport is not None
        self._start_answer()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            answer = await self._waiter
        except BaseException:
            self.abort()
            raise
        finally:
            self._waiter = None
        if not self._keep_alive:
            self.abort()
        return answer

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class RenderClient:
    """Calls the Video Orchestrator. ``render`` returns a validated result or raises RenderError.

    ``RenderError.transport`` is true when the orchestrator could not be reached or dropped the
    connection (refused, reset, connect timeout), as opposed to an answer about the job.
    Connections are kept alive and reused, the most recently used first; at most
    ``max_connections`` are kept idle. There is one connection per render in flight, so the
    dispatcher's ``max_inflight`` bounds how many are open at once.
    """

    def __init__(self, base_url: str, *, connect_timeout: float = 5.0, max_connections: int = 100) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            # not the URL itself: it may carry credentials
            raise ValueError(f"the orchestrator URL must be http:// or https://host[:port][/path], "
                             f"not {url.scheme or 'without a scheme'}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        # credentials in the URL (http://user:secret@host) go as Basic authorization, as most clients do
        auth = ""
        if url.username is not None:
            token = base64.b64encode(f"{unquote(url.username)}:{unquote(url.password or '')}".encode()).decode()
            auth = f"Authorization: Basic {token}\r\n"
        self._headers = (f"Host: {url.netloc.rsplit('@', 1)[-1]}\r\nUser-Agent: reactor\r\n{auth}"
                         "Accept: application/json\r\nContent-Type: application/json\r\n")
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._idle: list[_Connection] = []

    def _request(self, method: str, path: str, body: bytes = b"") -> bytes:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._headers}Content-Length: {len(body)}\r\n\r\n"
        return head.encode("latin-1") + body

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise _transport_error("connecting to the orchestrator timed out") from exc
        except OSError as exc:
            raise _transport_error(f"cannot connect to the orchestrator: {exc}") from exc
        return conn

    async def _call(self, request: bytes) -> _Answer:
        conn = await self._connection()
        answer = await conn.exchange(request)
        if conn.reusable and len(self._idle) < self.max_connections:
            self._idle.append(conn)
        return answer

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    async def render(self, request: RenderRequest, timeout_s: float) -> RenderResult:
        # the deadline covers connecting, sending and the whole answer; when it passes the
        # connection is aborted, which is how the orchestrator learns the render is cancelled
        message = self._request("POST", "/render", json.dumps(request.to_json()).encode())
        try:
            with anyio.fail_after(timeout_s):
                answer = await self._call(message)
        except TimeoutError as exc:
            raise RenderError("TIMEOUT", f"no answer within the deadline of {timeout_s:g} s") from exc
        except _Dropped as exc:
            raise _transport_error(f"connection reset by the orchestrator: {exc}") from exc
        except _Malformed as exc:
            raise RenderError("UNKNOWN", f"render call failed: {exc}") from exc
        except OSError as exc:
            raise _transport_error(f"connection reset by the orchestrator: {exc!r}") from exc
        return _read_answer(answer.status, answer.body.decode("utf-8", "replace"), answer.headers.get("retry-after"))

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when ``GET /health`` answers 2xx."""
        try:
            with anyio.fail_after(timeout_s):
                answer = await self._call(self._request("GET", "/health"))
        except (TimeoutError, RenderError, _Dropped, _Malformed, OSError):
            return False
        return 200 <= answer.status < 300


def _transport_error(message: str) -> RenderError:
    err = RenderError("TIMEOUT", message)
    err.transport = True
    return err


def _read_answer(status: int, text: str, retry_after_header: str | None) -> RenderResult:
    if not 200 <= status < 300:
        category = category_for_status(status)
        retry_after = parse_retry_after(retry_after_header, datetime.now(UTC))
        raise RenderError(
            category,
            f"orchestrator answered {status}",
            status_code=status,
            body=text[:BODY_EXCERPT],
            retry_after=retry_after,
        )
    try:
        return RenderResult.model_validate(json.loads(text, parse_constant=_no_constant))
    except (ValueError, ValidationError, TypeError, RecursionError) as exc:  # whatever the body holds
        raise RenderError(
            "UNKNOWN",
            f"malformed answer from the orchestrator: {_short(exc)}",
            status_code=status,
            body=text[:BODY_EXCERPT],
        ) from exc


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return str(exc)[:200]
