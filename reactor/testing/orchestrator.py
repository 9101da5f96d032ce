"""Orchestrator double: a test double of the Video Orchestrator HTTP API.

This is **not** the real Video Orchestrator. It is a small, fast HTTP/1.1 server (asyncio streams,
keep-alive, no dependencies) that the demo, the tests and the benchmarks point the reactor at. It
answers render requests like the real API would, and lets you choose how each one goes: success,
error status, hang, malformed or non-JSON body, or a connection reset.

Endpoints
---------
``POST /render``
    Body ``{"job_id", "job_type", "input", "style", "length", "voice"}`` (only ``job_id`` is
    required; a body that is not a JSON object with a ``job_id`` gets ``400``). The double waits
    ``latency_ms`` plus a uniform random jitter in ``[0, jitter_ms]``, then answers according to
    the chosen outcome. On success: ``200`` with
    ``{"video_url": "<base>/videos/<job_id>.mp4", "thumbnail_url": "<base>/videos/<job_id>.jpg",
    "duration": <float seconds>, "processing_time_ms": <int>}`` (``duration`` is ``length`` when
    that is a number, else 42.0).
``GET /health``
    ``200 {"ok": true}``, or ``health_status`` when that was configured otherwise.
``GET|HEAD /videos/<name>``
    ``200`` with a few bytes (``video/mp4``; ``image/jpeg`` for ``.jpg``); honours a single
    ``Range: bytes=A-B`` with ``206`` and ``Content-Range``.
``GET /stats``
    ``{"received", "in_flight", "max_in_flight", "max_in_flight_by_type": {job_type: n},
    "outcomes": {outcome: n}, "aborted"}``. ``aborted`` counts renders whose client disconnected
    before the answer (this is how the reactor cancels a render).
``GET /requests``
    Every ``/render`` received, in arrival order: ``{"job_id", "job_type", "input", "style",
    "length", "voice", "received_at", "answered_at" (or null), "outcome", "aborted"}``.
``POST /reset``
    Clears the records, the counters and the ``fail_first`` attempt counts; keeps the settings.
``POST /control``
    Changes the behaviour at run time; any subset of ``{"latency_ms", "jitter_ms", "mix",
    "retry_after_s", "health_status", "seed"}``. Answers ``200`` with the full current settings
    (``400`` on an unknown key or a bad value, nothing changed).

Outcomes
--------
``ok``; ``status:<code>`` (400-599; ``503`` and ``429`` carry ``Retry-After: <retry_after_s>``);
``hang`` (never answers; ends when the client disconnects); ``malformed`` (``200`` with
``{"video": 1}``); ``garbage`` (``200`` with ``<html>oops``, not JSON); ``reset`` (the TCP
connection is reset without an answer).

How the outcome of a render is chosen (first match wins)
--------------------------------------------------------
1. Markers inside the ``input`` string (so tests pick a job's fate with plain SQL):
   ``[[status=500]]``, ``[[hang]]``, ``[[malformed]]``, ``[[garbage]]``, ``[[reset]]``,
   ``[[ok]]`` and ``[[fail_first=N:OUTCOME]]`` (e.g. ``[[fail_first=2:status=503]]``: the first
   2 requests for that ``job_id`` get ``status:503``, later ones succeed). When several outcome
   markers are present, the first one in the text wins. ``[[latency=2000]]`` replaces the
   latency and jitter for that request (ms) and combines with any other marker.
2. The global ``mix``: outcome -> weight, e.g. ``{"ok": 90, "status:500": 5, "hang": 5}``, drawn
   from a ``random.Random(seed)``; the default mix is ``{"ok": 1}``.

Use it from Python (``async with OrchestratorDouble(latency_ms=50) as orch: orch.url``) or run
it: ``python -m reactor.testing.orchestrator --port 8700 --latency-ms 200 --mix ok=90,status:500=5,hang=5``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

from reactor.core.errors import ReactorError

__all__ = [
    "OUTCOME_NAMES",
    "OrchestratorDouble",
    "add_arguments",
    "parse_mix",
    "run_from_args",
]

logger = logging.getLogger(__name__)

#: The outcomes without a parameter; ``status:<code>`` comes on top of these.
OUTCOME_NAMES: tuple[str, ...] = ("ok", "hang", "malformed", "garbage", "reset")

_SETTING_KEYS = frozenset(
    {"latency_ms", "jitter_ms", "mix", "retry_after_s", "health_status", "seed", "video_base"}
)
_MARKER_RE = re.compile(r"\[\[\s*([A-Za-z_]+)\s*(?:=\s*([^\]]*?))?\s*\]\]")
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024
_RETRY_AFTER_STATUSES = frozenset({429, 503})

_MP4_BYTES = (
    b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41\x00\x00\x00\x08free\x00\x00\x00\x10mdatreactor-demo"
)
_JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
_OCTET_BYTES = b"reactor orchestrator double\n"


# --------------------------------------------------------------------------------------------
# Settings and outcomes
# --------------------------------------------------------------------------------------------


def _normalize_outcome(raw: str) -> str:
    """Return the canonical name of an outcome (``status=500`` -> ``status:500``)."""
    text = raw.strip().lower()
    if text in OUTCOME_NAMES:
        return text
    for sep in (":", "="):
        prefix = "status" + sep
        if text.startswith(prefix):
            code_text = text[len(prefix) :].strip()
            try:
                code = int(code_text)
            except ValueError:
                raise ValueError(f"bad status code in outcome {raw!r}") from None
            if not 400 <= code <= 599:
                raise ValueError(f"status outcome must be 400-599, got {code}")
            return f"status:{code}"
    raise ValueError(f"unknown outcome {raw!r} (expected one of {', '.join(OUTCOME_NAMES)} or status:<code>)")


def _number(name: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result) or result < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return result


def _validate_mix(mix: Any) -> dict[str, float]:
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"mix must be a non-empty mapping outcome -> weight, got {mix!r}")
    result: dict[str, float] = {}
    for key, weight in mix.items():
        if not isinstance(key, str):
            raise ValueError(f"mix keys must be outcome strings, got {key!r}")
        outcome = _normalize_outcome(key)
        result[outcome] = result.get(outcome, 0.0) + _number(f"mix weight of {key!r}", weight)
    if sum(result.values()) <= 0:
        raise ValueError("mix weights must not all be zero")
    return result


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``"ok=90,status:500=5,hang=5"`` into ``{"ok": 90.0, "status:500": 5.0, ...}``."""
    raw: dict[str, float] = {}
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        name, sep, weight_text = item.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"bad mix entry {item!r} (expected OUTCOME=WEIGHT)")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"bad weight in mix entry {item!r}") from None
        raw[name.strip()] = raw.get(name.strip(), 0.0) + weight
    return _validate_mix(raw)


@dataclass(frozen=True, slots=True)
class _Markers:
    outcome: str | None = None  # first plain outcome marker
    fail_first: tuple[int, str] | None = None
    fail_first_wins: bool = False  # fail_first came before any plain outcome marker
    latency_ms: float | None = None


def _parse_markers(text: str) -> _Markers:
    outcome: str | None = None
    fail_first: tuple[int, str] | None = None
    fail_first_wins = False
    latency: float | None = None
    for match in _MARKER_RE.finditer(text):
        name = match.group(1).lower()
        value = (match.group(2) or "").strip()
        try:
            if name == "latency":
                if latency is None:
                    latency = _number("latency marker", float(value))
            elif name == "fail_first":
                if fail_first is None:
                    count_text, sep, what = value.partition(":")
                    if not sep:
                        raise ValueError("expected fail_first=N:OUTCOME")
                    count = int(count_text)
                    if count < 0:
                        raise ValueError("fail_first count must be >= 0")
                    fail_first = (count, _normalize_outcome(what))
                    fail_first_wins = outcome is None
            elif name == "status":
                if outcome is None:
                    outcome = _normalize_outcome(f"status:{value}")
            elif name in OUTCOME_NAMES and not value:
                if outcome is None:
                    outcome = name
            else:
                logger.debug("ignoring unknown marker %s", match.group(0))
        except ValueError as exc:
            logger.warning("ignoring bad marker %s: %s", match.group(0), exc)
    return _Markers(outcome, fail_first, fail_first_wins, latency)


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _BadRequest(ReactorError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> _Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _Response(status, body, "application/json", headers or [])


def _error(status: int, message: str) -> _Response:
    return _json_response(status, {"error": message, "status": status})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _encode_response(response: _Response, *, keep_alive: bool, head: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}", "Server: reactor-devorch"]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}")
    lines.append(f"Content-Length: {len(response.body)}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data if head else data + response.body


class _Conn:
    """One client connection: a byte buffer over the stream reader, plus EOF detection."""

    __slots__ = ("_pending", "buf", "eof", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self._pending: asyncio.Task[bytes] | None = None

    async def _read_chunk(self) -> bytes:
        try:
            return await self.reader.read(_READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF."""
        if self.eof:
            return False
        if self._pending is not None:
            task, self._pending = self._pending, None
            data = await task
        else:
            data = await self._read_chunk()
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def wait_for_eof(self, wait_s: float | None) -> bool:
        """Wait up to ``wait_s`` seconds (None: forever); True if the peer closed meanwhile.

        Bytes that arrive meanwhile (a pipelined request) stay buffered for the next read.
        """
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        while not self.eof:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            if len(self.buf) > _MAX_BODY_BYTES + _MAX_HEADER_BYTES:
                # The peer is flooding us; stop reading and just wait.
                await asyncio.sleep(remaining if remaining is not None else 3600.0)
                continue
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._read_chunk())
            done, _ = await asyncio.wait({self._pending}, timeout=remaining)
            if not done:
                return False
            task, self._pending = self._pending, None
            data = task.result()
            if not data:
                self.eof = True
            else:
                self.buf += data
        return True

    def close_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    async def read_request(self) -> _Request | None:
        """Parse the next request; None when the peer closed between requests."""
        while True:
            while self.buf[:2] == b"\r\n":  # tolerate stray CRLFs between requests
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > _MAX_HEADER_BYTES:
                raise _BadRequest(431, "request header too large")
            if not await self._fill():
                return None
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, f"bad request line {request_line[:100]!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, f"bad header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(501, "chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest(400, "bad Content-Length") from None
        if length < 0 or length > _MAX_BODY_BYTES:
            raise _BadRequest(413 if length > 0 else 400, "bad Content-Length")
        if length > len(self.buf) and headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self.buf) < length:
            if not await self._fill():
                return None
        body = bytes(self.buf[:length])
        del self.buf[:length]
        connection = headers.get("connection", "").lower()
        keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
        path = target.split("?", 1)[0]
        if path.startswith(("http://", "https://")):  # absolute-form target
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        return _Request(method.upper(), path, headers, body, keep_alive)


def _video_response(name: str, range_header: str | None) -> _Response:
    lower = name.lower()
    if lower.endswith((".jpg", ".jpeg")):
        content_type, data = "image/jpeg", _JPEG_BYTES
    elif lower.endswith(".mp4"):
        content_type, data = "video/mp4", _MP4_BYTES
    else:
        content_type, data = "application/octet-stream", _OCTET_BYTES
    headers = [("Accept-Ranges", "bytes")]
    size = len(data)
    if range_header:
        unit, _, spec = range_header.partition("=")
        first_text, dash, last_text = spec.strip().partition("-")
        if unit.strip().lower() == "bytes" and dash and "," not in spec:
            try:
                if first_text:
                    first = int(first_text)
                    last = int(last_text) if last_text else size - 1
                else:  # suffix range: the last N bytes
                    first, last = max(size - int(last_text), 0), size - 1
            except ValueError:
                first, last = -1, -1  # unparseable: ignore the header
            if first >= 0 and last >= first:
                if first >= size:
                    headers.append(("Content-Range", f"bytes */{size}"))
                    return _Response(416, b"", content_type, headers)
                last = min(last, size - 1)
                headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
                return _Response(206, data[first : last + 1], content_type, headers)
    return _Response(200, data, content_type, headers)


def _as_text(value: Any) -> str:
    """A JSON value as a string: strings as they are, null as "", others as JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value)


def _format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


# --------------------------------------------------------------------------------------------
# The double
# --------------------------------------------------------------------------------------------


class OrchestratorDouble:
    """A test double of the Video Orchestrator API (see the module docstring)."""

    def __init__(
        self,
        *,
        latency_ms: float = 0,
        jitter_ms: float = 0,
        mix: Mapping[str, float] | None = None,
        retry_after_s: float = 1.0,
        health_status: int = 200,
        seed: int | None = None,
    ) -> None:
        self._latency_ms = 0.0
        self._jitter_ms = 0.0
        self._mix: dict[str, float] = {"ok": 1.0}
        self._mix_outcomes: list[str] = ["ok"]
        self._mix_cum_weights: list[float] = [1.0]
        self._retry_after_s = 1.0
        self._health_status = 200
        self._video_base: str | None = None
        self._seed: int | None = None
        self._rng = random.Random()
        self._jitter_rng = random.Random()
        settings: dict[str, Any] = {
            "latency_ms": latency_ms,
            "jitter_ms": jitter_ms,
            "retry_after_s": retry_after_s,
            "health_status": health_status,
            "seed": seed,
        }
        if mix is not None:
            settings["mix"] = mix
        self.configure(**settings)
        if seed is None:
            self._reseed(None)

        self._server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._stopping = False
        self._connections: dict[asyncio.Task[Any], _Conn] = {}
        self._reset_state()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); return the base URL."""
        if self._server is not None:
            raise RuntimeError("the orchestrator double is already running")
        server = await asyncio.start_server(self._handle, host, port, reuse_address=True, limit=_READ_CHUNK)
        self._server = server
        self._host = host
        self._port = int(server.sockets[0].getsockname()[1])
        logger.debug("orchestrator double listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Close the listener and every open connection (in-flight renders are dropped)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        try:
            server.close()
            for conn in list(self._connections.values()):
                conn.writer.transport.abort()
            tasks = list(self._connections)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
        finally:
            self._stopping = False
        logger.debug("orchestrator double on port %s stopped", self._port)

    async def __aenter__(self) -> OrchestratorDouble:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port it listens (or last listened) on."""
        if self._port is None:
            raise RuntimeError("the orchestrator double has not been started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:43123`` (kept after ``stop()``)."""
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- settings ----------------------------------------------------------------------------

    def configure(self, **settings: Any) -> None:
        """Change the behaviour; same keys as ``POST /control``. Raises ValueError (no change)."""
        unknown = set(settings) - _SETTING_KEYS
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_SETTING_KEYS))}"
            )
        new: dict[str, Any] = {}
        if "latency_ms" in settings:
            new["latency_ms"] = _number("latency_ms", settings["latency_ms"])
        if "jitter_ms" in settings:
            new["jitter_ms"] = _number("jitter_ms", settings["jitter_ms"])
        if "retry_after_s" in settings:
            new["retry_after_s"] = _number("retry_after_s", settings["retry_after_s"])
        if "mix" in settings:
            new["mix"] = _validate_mix(settings["mix"])
        if "health_status" in settings:
            status = settings["health_status"]
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                raise ValueError(f"health_status must be an HTTP status code, got {status!r}")
            new["health_status"] = status
        if "video_base" in settings:
            base = settings["video_base"]
            if base is not None and (not isinstance(base, str) or not base.startswith(("http://", "https://"))):
                raise ValueError(f"video_base must be an http(s) URL or null, got {base!r}")
            new["video_base"] = base
        if "seed" in settings:
            seed = settings["seed"]
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError(f"seed must be an integer or null, got {seed!r}")
            new["seed"] = seed

        if "latency_ms" in new:
            self._latency_ms = new["latency_ms"]
        if "jitter_ms" in new:
            self._jitter_ms = new["jitter_ms"]
        if "retry_after_s" in new:
            self._retry_after_s = new["retry_after_s"]
        if "health_status" in new:
            self._health_status = new["health_status"]
        if "mix" in new:
            mix: dict[str, float] = new["mix"]
            self._mix = mix
            self._mix_outcomes = list(mix)
            total = 0.0
            self._mix_cum_weights = []
            for weight in mix.values():
                total += weight
                self._mix_cum_weights.append(total)
        if "video_base" in new:
            self._video_base = new["video_base"]
        if "seed" in new:
            self._reseed(new["seed"])

    def _reseed(self, seed: int | None) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._jitter_rng = random.Random(None if seed is None else seed + 1)

    @property
    def settings(self) -> dict[str, Any]:
        """The current settings (what ``POST /control`` answers)."""
        return {
            "latency_ms": self._latency_ms,
            "jitter_ms": self._jitter_ms,
            "mix": dict(self._mix),
            "retry_after_s": self._retry_after_s,
            "health_status": self._health_status,
            "seed": self._seed,
            "video_base": self._video_base,
        }

    # -- records -----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._received = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._in_flight_by_type: dict[str, int] = {}
        self._max_in_flight_by_type: dict[str, int] = {}
        self._outcomes: dict[str, int] = {}
        self._aborted = 0
        self._attempts: dict[str, int] = {}

    def reset(self) -> None:
        """Clear the records, counters and fail_first attempt counts (not the settings)."""
        self._reset_state()

    def stats(self) -> dict[str, Any]:
        """Counters; same content as ``GET /stats``."""
        return {
            "received": self._received,
            "in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "max_in_flight_by_type": dict(self._max_in_flight_by_type),
            "outcomes": dict(self._outcomes),
            "aborted": self._aborted,
        }

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every ``/render`` received, in arrival order; same as ``GET /requests``."""
        return [dict(record) for record in self._records]

    # -- connection handling -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(reader, writer)
        self._connections[task] = conn
        try:
            while True:
                try:
                    request = await conn.read_request()
                except _BadRequest as exc:
                    writer.write(_encode_response(_error(exc.status, exc.message), keep_alive=False))
                    await writer.drain()
                    break
                if request is None:
                    break
                if not await self._dispatch(conn, request):
                    break
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            conn.close_pending()
            self._connections.pop(task, None)
            writer.close()

    async def _send(self, conn: _Conn, request: _Request, response: _Response) -> bool:
        keep_alive = request.keep_alive and not conn.eof
        head = request.method == "HEAD"
        conn.writer.write(_encode_response(response, keep_alive=keep_alive, head=head))
        await conn.writer.drain()
        return keep_alive

    async def _dispatch(self, conn: _Conn, request: _Request) -> bool:
        path, method = request.path, request.method
        if path == "/render":
            if method != "POST":
                return await self._send(conn, request, _method_not_allowed("POST"))
            return await self._render(conn, request)
        if path.startswith("/videos/") and len(path) > len("/videos/"):
            if method not in ("GET", "HEAD"):
                return await self._send(conn, request, _method_not_allowed("GET, HEAD"))
            name = unquote(path[len("/videos/") :])
            response = _video_response(name, request.headers.get("range"))
            return await self._send(conn, request, response)
        if path in ("/health", "/stats", "/requests"):
            if method not in ("GET", "HEAD"):
                return await self._send(conn, request, _method_not_allowed("GET, HEAD"))
            if path == "/health":
                status = self._health_status
                response = _json_response(status, {"ok": 200 <= status < 300})
            elif path == "/stats":
                response = _json_response(200, self.stats())
            else:
                response = _json_response(200, self._records)
            return await self._send(conn, request, response)
        if path in ("/reset", "/control"):
            if method != "POST":
                return await self._send(conn, request, _method_not_allowed("POST"))
            if path == "/reset":
                self.reset()
                return await self._send(conn, request, _json_response(200, {"ok": True}))
            return await self._send(conn, request, self._control(request.body))
        return await self._send(conn, request, _error(404, f"no such path {path!r}"))

    def _control(self, body: bytes) -> _Response:
        try:
            payload = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(400, "body must be a JSON object")
        try:
            self.configure(**payload)
        except ValueError as exc:
            return _error(400, str(exc))
        logger.info("orchestrator double settings changed: %s", payload)
        return _json_response(200, self.settings)

    # -- /render -----------------------------------------------------------------------------

    def _choose(self, job_key: str, text: str) -> tuple[str, float | None]:
        markers = _parse_markers(text) if "[[" in text else _Markers()
        attempt = self._attempts.get(job_key, 0) + 1
        self._attempts[job_key] = attempt
        if markers.fail_first is not None and markers.fail_first_wins:
            count, failure = markers.fail_first
            return (failure if attempt <= count else "ok"), markers.latency_ms
        if markers.outcome is not None:
            return markers.outcome, markers.latency_ms
        if len(self._mix_outcomes) == 1:
            return self._mix_outcomes[0], markers.latency_ms
        outcome = self._rng.choices(self._mix_outcomes, cum_weights=self._mix_cum_weights)[0]
        return outcome, markers.latency_ms

    async def _render(self, conn: _Conn, request: _Request) -> bool:
        started = time.monotonic()
        received_at = time.time()
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return await self._send(conn, request, _error(400, "body is not valid JSON"))
        if not isinstance(payload, dict) or payload.get("job_id") is None:
            response = _error(400, "body must be a JSON object with a job_id")
            return await self._send(conn, request, response)
        job_id = payload["job_id"]
        job_key = job_id if isinstance(job_id, str) else json.dumps(job_id)
        raw_type = payload.get("job_type")
        job_type = _as_text(raw_type)
        raw_input = payload.get("input")
        text = raw_input if isinstance(raw_input, str) else _as_text(raw_input)

        outcome, latency_override = self._choose(job_key, text)
        record: dict[str, Any] = {
            "job_id": job_id,
            "job_type": raw_type,
            "input": raw_input,
            "style": payload.get("style"),
            "length": payload.get("length"),
            "voice": payload.get("voice"),
            "received_at": received_at,
            "answered_at": None,
            "outcome": outcome,
            "aborted": False,
        }
        self._records.append(record)
        self._received += 1
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        by_type = self._in_flight_by_type.get(job_type, 0) + 1
        self._in_flight_by_type[job_type] = by_type
        self._max_in_flight_by_type[job_type] = max(self._max_in_flight_by_type.get(job_type, 0), by_type)
        records = self._records  # a reset() meanwhile must not touch the new counters
        in_flight = True

        def finish() -> None:
            nonlocal in_flight
            if in_flight and records is self._records:
                self._in_flight -= 1
                self._in_flight_by_type[job_type] = self._in_flight_by_type.get(job_type, 1) - 1
            in_flight = False

        try:
            if latency_override is not None:
                delay_ms = latency_override
            else:
                delay_ms = self._latency_ms
                if self._jitter_ms > 0:
                    delay_ms += self._jitter_rng.uniform(0.0, self._jitter_ms)
            if outcome == "hang":
                aborted = await conn.wait_for_eof(None)
            elif delay_ms > 0:
                aborted = await conn.wait_for_eof(delay_ms / 1000.0)
            else:
                aborted = conn.eof
            elapsed_ms = round((time.monotonic() - started) * 1000.0)
            if aborted:
                finish()
                record["aborted"] = True
                if records is self._records:
                    self._aborted += 1
                logger.info(
                    "render job_id=%s outcome=%s aborted by the client after %d ms",
                    job_id,
                    outcome,
                    elapsed_ms,
                )
                return False
            record["answered_at"] = time.time()
            finish()
            if outcome == "reset":
                logger.info("render job_id=%s outcome=reset ms=%d", job_id, elapsed_ms)
                sock = conn.writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        linger = struct.pack("ii", 1, 0)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                conn.writer.transport.abort()
                return False
            response = self._render_response(outcome, job_id, payload.get("length"), elapsed_ms)
            logger.info("render job_id=%s outcome=%s ms=%d", job_id, outcome, elapsed_ms)
            return await self._send(conn, request, response)
        finally:
            finish()

    def _render_response(self, outcome: str, job_id: Any, length: Any, elapsed_ms: int) -> _Response:
        if outcome == "ok":
            name = quote(str(job_id), safe="")
            # where the video "is": this double by default, or video_base (a dead link, say)
            base = (self._video_base or self.url).rstrip("/")
            if isinstance(length, int | float) and not isinstance(length, bool) and length > 0:
                duration = float(length)
            else:
                duration = 42.0
            return _json_response(
                200,
                {
                    "video_url": f"{base}/videos/{name}.mp4",
                    "thumbnail_url": f"{base}/videos/{name}.jpg",
                    "duration": duration,
                    "processing_time_ms": elapsed_ms,
                },
            )
        if outcome == "malformed":
            return _json_response(200, {"video": 1})
        if outcome == "garbage":
            return _Response(200, b"<html>oops", "text/html")
        code = int(outcome.split(":", 1)[1])
        headers: list[tuple[str, str]] = []
        if code in _RETRY_AFTER_STATUSES:
            headers.append(("Retry-After", _format_seconds(self._retry_after_s)))
        body = {
            "error": f"simulated {code} {_reason(code)} from the orchestrator double",
            "status": code,
            "job_id": job_id,
        }
        return _json_response(code, body, headers)


def _method_not_allowed(allow: str) -> _Response:
    response = _error(405, "method not allowed")
    response.headers.append(("Allow", allow))
    return response


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dev-orchestrator`` options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8700, help="port to listen on (0: any)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="render latency in ms")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform random latency, up to this (ms)")
    parser.add_argument(
        "--mix",
        default=None,
        help="outcome weights, e.g. ok=90,status:500=5,hang=5 (default: ok=1)",
    )
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on 503 and 429")
    parser.add_argument("--health-status", type=int, default=200, help="status that GET /health answers")
    parser.add_argument("--seed", type=int, default=None, help="seed of the outcome mix")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the double until SIGINT or SIGTERM; return the exit status."""
    try:
        double = OrchestratorDouble(
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            mix=parse_mix(args.mix) if args.mix else None,
            retry_after_s=args.retry_after,
            health_status=getattr(args, "health_status", 200),
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2

    async def serve() -> int:
        try:
            url = await double.start(args.host, args.port)
        except OSError as exc:
            print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)  # noqa: T201
            return 1
        print(f"orchestrator double listening on {url}", flush=True)  # noqa: T201
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await double.stop()
        return 0

    try:
        try:
            import uvloop  # the benchmarks drive >1,000 renders/s through this double
        except ImportError:
            return asyncio.run(serve())
        return uvloop.run(serve())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m reactor.testing.orchestrator",
        description="Run the orchestrator double (a test double of the Video Orchestrator API).",
    )
    add_arguments(_parser)
    _parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    _args = _parser.parse_args()
    logging.basicConfig(
        level=getattr(logging, str(_args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(run_from_args(_args))
